import math

import pytest
import torch

from recbench.metrics import RankingMetrics, case_metric_values, metric_names, target_ranks


def _metrics(ranked: list[list[int]], target: list[int]) -> dict[str, float]:
    metric = RankingMetrics((5, 10, 20))
    metric.update(torch.tensor(ranked), torch.tensor(target))
    return {name: float(value) for name, value in metric.compute().items()}


def _ranked_with_target_at(rank: int, target: int = 999, length: int = 20) -> list[int]:
    ranked = list(range(1, length + 1))
    if rank:
        ranked[rank - 1] = target
    return ranked


@pytest.mark.parametrize("rank", [1, 3, 10, 11, 0])
def test_single_case_matches_hand_computation(rank: int) -> None:
    values = _metrics([_ranked_with_target_at(rank)], [999])
    for k in (5, 10, 20):
        hit = 0 < rank <= k
        assert values[f"recall@{k}"] == (1.0 if hit else 0.0)
        assert values[f"ndcg@{k}"] == pytest.approx(1.0 / math.log2(rank + 1) if hit else 0.0)
        assert values[f"mrr@{k}"] == pytest.approx(1.0 / rank if hit else 0.0)


def test_hand_computed_batch_average() -> None:
    # ranks 1, 3 and a miss -> recall@5 = 2/3, ndcg@5 = (1 + 1/log2(4)) / 3 = 0.5, mrr@5 = (1 + 1/3) / 3
    values = _metrics([_ranked_with_target_at(1), _ranked_with_target_at(3), _ranked_with_target_at(0)], [999] * 3)
    assert values["recall@5"] == pytest.approx(2 / 3)
    assert values["ndcg@5"] == pytest.approx(0.5)
    assert values["mrr@5"] == pytest.approx(4 / 9)


def test_fewer_than_k_valid_ids_are_misses() -> None:
    # Only 3 valid ids, the rest padded with 0; the target sits at rank 2.
    values = _metrics([[4, 7, 9] + [0] * 17], [7])
    assert values["recall@5"] == 1.0 and values["ndcg@5"] == pytest.approx(1 / math.log2(3))
    values = _metrics([[4, 0, 0]], [7])
    assert values["recall@20"] == 0.0


def test_duplicates_count_once_and_pad_target_rejected() -> None:
    assert target_ranks(torch.tensor([[3, 3, 3]]), torch.tensor([3])).tolist() == [1]
    with pytest.raises(ValueError, match="padding"):
        target_ranks(torch.tensor([[1, 2]]), torch.tensor([0]))


def test_case_values_average_to_metric() -> None:
    generator = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.randperm(50, generator=generator)[:20] + 1 for _ in range(64)])
    target = torch.randint(1, 51, (64,), generator=generator)
    per_case = case_metric_values(ranked, target)
    metric = RankingMetrics()
    metric.update(ranked, target)
    computed = metric.compute()
    for column, name in enumerate(metric_names()):
        assert float(per_case[:, column].mean()) == pytest.approx(float(computed[name]), abs=1e-12)


def test_state_is_integer_so_reduction_is_exact() -> None:
    metric = RankingMetrics()
    assert metric.rank_counts.dtype == torch.long and metric.num_cases.dtype == torch.long


def test_states_reset_under_inference_mode_still_update_outside_it() -> None:
    # Lightning resets metrics inside inference mode; a later no_grad update must not fail.
    from recbench.metrics import DecodeStats

    metric, stats = RankingMetrics(), DecodeStats()
    with torch.inference_mode():
        metric.reset()
        stats.reset()
    with torch.no_grad():
        metric.update(torch.tensor([[1, 2, 3]]), torch.tensor([2]))
        stats.update(1, 5)
    assert float(metric.compute()["recall@5"]) == 1.0
    assert stats.compute().tolist() == [1.0, 5.0]
