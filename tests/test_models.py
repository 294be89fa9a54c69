"""The model contract, checked for every model YAML in benchmark/configs/model."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from torch.nn import functional as F

from benchmark.registry import config_names, instantiate_model
from recbench.batch import PAD_ID, SEQUENCE
from recbench.model import SeqRecModel

MODEL_CONFIGS = config_names("model")
EVALUATION_HOOKS = (
    "validation_step",
    "test_step",
    "predict_step",
    "on_validation_epoch_end",
    "on_test_epoch_end",
    "ranked_items",
)


def _model(name: str, data) -> SeqRecModel:
    return instantiate_model(name, data.num_items, data.max_len)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_instantiates_trains_and_recommends(name: str, tiny_data) -> None:
    pl.seed_everything(0)
    model = _model(name, tiny_data)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, datamodule=tiny_data)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one training step changed nothing"
    batch = next(iter(tiny_data.test_dataloader()))
    model.eval()
    k = 20
    ranked = model.recommend(batch["history"], k)
    assert ranked.shape == (len(batch["history"]), k) and ranked.dtype == torch.long
    assert bool(((ranked >= 0) & (ranked <= tiny_data.num_items)).all())
    for row in ranked:
        real = row[row != PAD_ID]
        assert len(set(real.tolist())) == len(real), "recommend returned a duplicate item"
        # zeros only at the tail
        assert bool((row[len(real):] == PAD_ID).all())


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_no_model_overrides_the_shared_evaluation(name: str, tiny_data) -> None:
    cls = type(_model(name, tiny_data))
    for hook in EVALUATION_HOOKS:
        assert getattr(cls, hook) is getattr(SeqRecModel, hook), f"{cls.__name__} overrides {hook}"


def test_every_model_file_has_a_config() -> None:
    import baselines

    files = {path.stem for path in Path(baselines.__path__[0]).glob("*.py")} - {"__init__"}
    assert files <= set(MODEL_CONFIGS), f"models without a YAML: {files - set(MODEL_CONFIGS)}"


def test_both_protocols_from_one_ranking_on_hand_cases(tiny_data) -> None:
    from recbench.metrics import case_metric_values

    model = instantiate_model("popularity", tiny_data.num_items, tiny_data.max_len)
    model.counts[1:] = torch.arange(tiny_data.num_items, 0, -1)  # item 1 most popular, then 2, 3, ...
    history = torch.tensor([[0, 0, 1, 3], [0, 0, 0, 2], [0, 0, 5, 5]])
    target = torch.tensor([3, 4, 5])
    kept, excluded, short = model.ranked_items_both(history, 3)
    assert kept.tolist() == [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    # history items (1 and 3 / 2 / 5) leave the list; the rest keeps the model's order
    assert excluded.tolist() == [[2, 4, 5], [1, 3, 4], [1, 2, 3]]
    assert not bool(short.any())
    kept_values = case_metric_values(kept, target, (1, 3))
    excluded_values = case_metric_values(excluded, target, (1, 3))
    recall_at_3 = 3  # columns: recall@1, ndcg@1, mrr@1, recall@3, ...
    # case 0: the target (3) is also in the history: a hit kept at rank 3, a miss once excluded
    assert kept_values[0, recall_at_3] == 1.0 and excluded_values[0, recall_at_3] == 0.0
    # case 1: history item 2 ranked second is dropped, so target 4 moves from rank 4 (miss) to rank 3
    assert kept_values[1, recall_at_3] == 0.0 and excluded_values[1, recall_at_3] == 1.0
    assert excluded_values[1, recall_at_3 + 1] == pytest.approx(0.5)  # ndcg@3 = 1 / log2(3 + 1)
    # case 2: a repeated history item counts once; target 5 is in the history, so excluded misses
    assert excluded_values[2, recall_at_3] == 0.0


def test_excluded_list_marked_short_when_the_model_returns_too_few(tiny_data) -> None:
    model = instantiate_model("popularity", tiny_data.num_items, tiny_data.max_len)
    model.counts.zero_()
    model.counts[1:4] = torch.tensor([3, 2, 1])  # the model knows only items 1..3
    _, excluded, short = model.ranked_items_both(torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]]), 3)
    assert excluded.tolist() == [[2, 3, 0], [1, 2, 3]]
    assert short.tolist() == [True, False]


def test_sasrec_bce1_loss_is_the_sampled_binary_loss(tiny_data) -> None:
    torch.manual_seed(0)
    model = instantiate_model("sasrec", tiny_data.num_items, tiny_data.max_len, loss="bce1").eval()
    sequence = torch.tensor([[0, 0, 3, 4, 5], [0, 1, 2, 3, 4]])
    batch = {SEQUENCE: sequence, "user": torch.tensor([1, 2])}
    torch.manual_seed(1)
    loss = model.loss(batch)
    torch.manual_seed(1)
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    valid = (inputs != PAD_ID) & (targets != PAD_ID)
    hidden, table = model.encode(inputs), model.item_embedding.weight
    negatives = model._sample_negatives(sequence, targets.shape)
    positive, negative = (hidden * table[targets]).sum(-1), (hidden * table[negatives]).sum(-1)
    expected = (F.softplus(-positive) + F.softplus(negative))[valid].mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    ce = instantiate_model("sasrec", tiny_data.num_items, tiny_data.max_len, loss="ce").eval()
    ce.load_state_dict(model.state_dict())
    assert not torch.allclose(ce.loss(batch), loss, atol=1e-3)  # the option changes the loss


def test_sasrec_ce_loss_is_the_full_softmax_over_real_positions(tiny_data) -> None:
    torch.manual_seed(0)
    model = instantiate_model("sasrec", tiny_data.num_items, tiny_data.max_len).eval()
    sequence = torch.tensor([[0, 0, 3, 4, 5], [0, 1, 2, 3, 4]])
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    valid = (inputs != PAD_ID) & (targets != PAD_ID)
    logits = model.encode(inputs)[valid] @ model.item_embedding.weight[1:].T
    expected = F.cross_entropy(logits, targets[valid] - 1)
    assert torch.allclose(model.loss({SEQUENCE: sequence}), expected, atol=1e-5)


def test_sasrec_output_ignores_padding(tiny_data) -> None:
    model = instantiate_model("sasrec", tiny_data.num_items, tiny_data.max_len).eval()
    history = torch.zeros(1, tiny_data.max_len, dtype=torch.long)
    history[0, -3:] = torch.tensor([5, 6, 7])
    hidden = model.encode(history)
    assert bool((hidden[0, :-3] == 0).all())
    with torch.no_grad():  # whatever the padding row holds, real positions must not see it
        model.item_embedding.weight[PAD_ID].normal_()
    assert torch.allclose(model.encode(history)[:, -3:], hidden[:, -3:], atol=1e-6)


def test_evaluation_scores_in_float32_under_bf16_autocast(tiny_data) -> None:
    pl.seed_everything(0)
    model = instantiate_model("sasrec", tiny_data.num_items, tiny_data.max_len).eval()
    history = torch.randint(1, tiny_data.num_items + 1, (16, tiny_data.max_len))
    plain = model.ranked_items(history, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.ranked_items(history, 20)
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the caller's autocast is restored
    assert torch.equal(plain, under_autocast)


def test_a_models_recipe_batch_size_reaches_the_loader_and_the_row() -> None:
    from datamodules.synthetic import SyntheticDataModule

    data = SyntheticDataModule(scale=0.02, batch_size=64, eval_batch_size=100, length_buckets=None)
    data.setup()
    model = instantiate_model("diffgrm", data.num_items, data.max_len, batch_size=16, hidden_size=16)
    trainer = quiet_trainer(limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert data.resolved_batch_size() == 16 and data.describe()["batch_size"] == 16
    assert next(iter(data.train_dataloader()))["target"].shape[0] == 16
    model.training_batch_size = None  # without a recipe the data's own batch size applies
    assert data.resolved_batch_size() == 64
    model.training_batch_size = 0
    with pytest.raises(ValueError, match="training_batch_size"):
        data.train_dataloader()


def test_id_level_metrics_count_any_item_sharing_the_targets_id(tiny_data) -> None:
    model = _model("popularity", tiny_data)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_data)
    plain = trainer.test(model, datamodule=tiny_data, verbose=False)[0]
    assert not any(name.startswith("test/id_") for name in plain), "item-level models report no ID-level metrics"
    keys = (torch.arange(tiny_data.num_items + 1) + 1) // 2  # items (1, 2), (3, 4), ... share an ID; PAD -> 0
    model.shared_id_keys = lambda: keys  # type: ignore[method-assign]
    metrics = trainer.test(model, datamodule=tiny_data, verbose=False)[0]
    hits, cases = 0, 0
    for batch in tiny_data.test_dataloader():
        kept = model.ranked_items(batch["history"], 20)[:, :10]
        hits += int((keys[kept] == keys[batch["target"]].unsqueeze(1)).any(dim=1).sum())
        cases += len(kept)
    assert metrics["test/id_recall@10"] == pytest.approx(hits / cases, abs=1e-6)
    assert metrics["test/id_recall@10"] > metrics["test/recall@10"] == pytest.approx(plain["test/recall@10"])
