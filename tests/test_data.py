import polars
import pytest
import torch

from datamodules.synthetic import SyntheticDataModule
from recbench.batch import HISTORY, PAD_ID, SEQUENCE, TARGET, USER, padding_slots, trim_left_padding
from recbench.data import DEFAULT_LENGTH_BUCKETS, CanonicalTables, LengthBucketSampler, SeqRecDataModule


def _sequences(data: SyntheticDataModule) -> dict[int, list[int]]:
    interactions = polars.read_parquet(data.cache_path / "interactions.parquet")
    return {
        int(user): items
        for user, items in interactions.group_by("user", maintain_order=True).agg(polars.col("item")).iter_rows()
    }


def _all(loader) -> dict[str, torch.Tensor]:
    """Every batch concatenated; grids of trimmed (bucketed) batches left-padded to the widest."""
    batches = list(loader)

    def widened(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if tensors[0].dim() < 2:
            return tensors
        width = max(t.shape[1] for t in tensors)
        return [torch.nn.functional.pad(t, (width - t.shape[1], 0), value=PAD_ID) for t in tensors]

    return {key: torch.cat(widened([b[key] for b in batches])) for key in batches[0]}


def test_leave_one_out_targets_and_left_padding(tiny_data: SyntheticDataModule) -> None:
    sequences = _sequences(tiny_data)
    test, val = _all(tiny_data.test_dataloader()), _all(tiny_data.val_dataloader())
    assert len(test[USER]) == len(sequences) == len(val[USER])
    for row in range(len(test[USER])):
        seq = sequences[int(test[USER][row])]
        assert int(test[TARGET][row]) == seq[-1] and int(val[TARGET][row]) == seq[-2]
        history = test[HISTORY][row]
        real = history[history != PAD_ID].tolist()
        assert real == seq[:-1][-tiny_data.max_len :]
        assert bool((history[: len(history) - len(real)] == PAD_ID).all())  # left padded


def _training_targets_from_windows(data: SyntheticDataModule) -> list[tuple[int, int, tuple[int, ...]]]:
    data.train_format = "sequence"
    out = []
    for batch in data.train_dataloader():
        for user, sequence in zip(batch[USER].tolist(), batch[SEQUENCE], strict=True):
            real = sequence[sequence != PAD_ID].tolist()
            out += [(user, real[i], tuple(real[:i])) for i in range(1, len(real))]
    return out


def _expected_pairs(sequences: dict[int, list[int]], max_len: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Independent reference: every position t >= 1 of the prefix seq[:-2], history = last max_len items."""
    return sorted(
        (user, seq[t], tuple(seq[max(0, t - max_len) : t])) for user, seq in sequences.items() for t in range(1, len(seq) - 2)
    )


def _loader_pairs(data: SyntheticDataModule) -> list[tuple[int, int, tuple[int, ...]]]:
    data.train_format = "pairs"
    pairs = _all(data.train_dataloader())
    return sorted(
        (user, target, tuple(history[history != PAD_ID].tolist()))
        for user, target, history in zip(pairs[USER].tolist(), pairs[TARGET].tolist(), pairs[HISTORY], strict=True)
    )


def test_every_training_position_is_a_target_exactly_once_in_both_views() -> None:
    data = SyntheticDataModule(scale=0.02, max_len=4, batch_size=64)  # short windows: long prefixes split
    data.setup()
    sequences = _sequences(data)
    expected = _expected_pairs(sequences, data.max_len)
    assert sorted((u, t) for u, t, _ in _training_targets_from_windows(data)) == [(u, t) for u, t, _ in expected]
    assert _loader_pairs(data) == expected


def test_validation_and_test_targets_never_train(tiny_data: SyntheticDataModule) -> None:
    sequences = _sequences(tiny_data)
    pairs = _loader_pairs(tiny_data)
    assert pairs == _expected_pairs(sequences, tiny_data.max_len)  # positions len-2 and len-1 excluded
    mask = tiny_data.train_item_mask()
    assert not mask[PAD_ID]
    trained = {item for seq in sequences.values() for item in seq[:-2]}
    assert set(torch.nonzero(mask).squeeze(1).tolist()) == trained


def test_session_split_evaluates_every_prefix() -> None:
    data = SyntheticDataModule(scale=0.02, split="session", max_len=10)
    data.setup()
    counts = data.split_counts
    sequences = _sequences(data)
    test = _all(data.test_dataloader())
    test_users = set(test[USER].tolist())
    assert counts.test_cases == len(test[USER]) == sum(len(sequences[u]) - 1 for u in test_users)
    assert abs(len(test_users) - round(0.1 * len(sequences))) <= 1
    data.train_format = "pairs"
    train_users = set(_all(data.train_dataloader())[USER].tolist())
    val_users = set(_all(data.val_dataloader())[USER].tolist())
    assert not (train_users & test_users) and not (val_users & test_users) and not (train_users & val_users)
    assert test[HISTORY].shape[1] == 10


def test_temporal_split_respects_the_time_cut() -> None:
    data = SyntheticDataModule(scale=0.02, split="temporal")
    data.setup()
    counts = data.split_counts
    assert counts.val_cases > 0 and counts.test_cases > 0
    assert counts.train_targets > counts.test_cases
    with pytest.raises(ValueError, match="needs real timestamps"):
        broken = _Broken(
            polars.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "order": [0, 1, 2]}), polars.DataFrame({"item": [1, 2, 3]})
        )
        broken.split = "temporal"
        broken.setup()


def test_validation_subset_is_seeded_and_recorded() -> None:
    a = SyntheticDataModule(scale=0.02, val_subset=100, split_seed=3)
    b = SyntheticDataModule(scale=0.02, val_subset=100, split_seed=3)
    a.setup(), b.setup()
    assert a.split_counts.val_subset == 100
    assert torch.equal(_all(a.val_dataloader())[USER], _all(b.val_dataloader())[USER])


def test_cache_is_reused_and_keyed_by_options(tiny_data: SyntheticDataModule) -> None:
    again = SyntheticDataModule(scale=0.02)
    assert again.cache_path == tiny_data.cache_path
    assert SyntheticDataModule(scale=0.02, seed=1).cache_path != tiny_data.cache_path
    assert SyntheticDataModule(scale=0.02, max_len=7).cache_path == tiny_data.cache_path  # split option only


class _Broken(SeqRecDataModule):
    name = "broken"

    def __init__(self, interactions: polars.DataFrame, items: polars.DataFrame) -> None:
        super().__init__()
        self._tables = CanonicalTables(interactions, items, order_is_time=False)

    def source_files(self):
        return []

    def preprocessing_signature(self) -> str:
        return str(self._tables.interactions.hash_rows().sum()) + str(self._tables.items.height)

    def read_tables(self) -> CanonicalTables:
        return self._tables


def test_unknown_item_and_bad_item_ids_are_reported() -> None:
    items = polars.DataFrame({"item": [1, 2, 3]})
    bad = polars.DataFrame({"user": [1, 1], "item": [1, 17], "order": [0, 1]})
    with pytest.raises(ValueError, match="missing from the item table.*item 17"):
        _Broken(bad, items).prepare_data()
    with pytest.raises(ValueError, match=r"exactly 1..N"):
        _Broken(bad, polars.DataFrame({"item": [1, 3]})).prepare_data()


def test_stable_tie_rule_keeps_file_order() -> None:
    items = polars.DataFrame({"item": [1, 2, 3]})
    interactions = polars.DataFrame({"user": [1, 1, 1], "item": [3, 1, 2], "order": [5, 5, 5]})
    data = _Broken(interactions, items)
    data.setup()
    assert data._flat_items.tolist() == [3, 1, 2]


# ------------------------------------------------------------------------------------------------
# Length-bucketed training batches
# ------------------------------------------------------------------------------------------------


def _epoch(loader, epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does every epoch
    return list(loader)


@pytest.mark.parametrize("view", ["pairs", "sequence"])
def test_bucketed_batches_serve_every_target_once_and_are_as_wide_as_their_longest_row(view: str) -> None:
    data = SyntheticDataModule(scale=0.02, max_len=6, batch_size=16, train_format=view, length_buckets=4)
    data.setup()
    sequences = _sequences(data)
    expected = _expected_pairs(sequences, data.max_len)
    grid_key = HISTORY if view == "pairs" else SEQUENCE
    batches = _epoch(data.train_dataloader())
    assert len(batches) == len(data.train_dataloader())
    served: list[tuple[int, int, tuple[int, ...]]] = []
    for batch in batches:
        grid = batch[grid_key]
        assert bool((grid[:, 0] != PAD_ID).any())  # width = the longest real row
        assert grid.shape[1] <= data.max_len + (view == "sequence")
        if view == "pairs":
            served += [
                (u, t, tuple(h[h != PAD_ID].tolist()))
                for u, t, h in zip(batch[USER].tolist(), batch[TARGET].tolist(), grid, strict=True)
            ]
        else:
            for user, sequence in zip(batch[USER].tolist(), grid, strict=True):
                real = sequence[sequence != PAD_ID].tolist()
                served += [(user, real[i], ()) for i in range(1, len(real))]
    if view == "pairs":
        assert sorted(served) == expected  # every target once, with its truncated history
    else:
        assert sorted((u, t) for u, t, _ in served) == [(u, t) for u, t, _ in expected]


def test_bucketed_batches_are_a_function_of_the_seed_and_the_epoch() -> None:
    data = SyntheticDataModule(scale=0.02, batch_size=32, train_format="pairs", length_buckets=DEFAULT_LENGTH_BUCKETS)
    data.setup()

    def users(seed: int, epoch: int) -> list[list[int]]:
        torch.manual_seed(seed)  # what seed_everything does; the loader reads torch.initial_seed()
        return [batch[USER].tolist() for batch in _epoch(data.train_dataloader(), epoch)]

    assert users(3, 0) == users(3, 0)
    assert users(3, 1) == users(3, 1)
    assert users(3, 1) != users(3, 0)  # reshuffled every epoch
    assert users(4, 0) != users(3, 0)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_get_disjoint_shares_with_equal_step_counts(world: int) -> None:
    lengths = torch.randint(1, 51, (1001,), generator=torch.Generator().manual_seed(0))
    shares = [
        list(LengthBucketSampler(lengths, batch_size=64, buckets=8, seed=7, num_replicas=world, rank=rank))
        for rank in range(world)
    ]
    # A DistributedSampler (of batches): Lightning then injects no sampler of its own under DDP.
    assert isinstance(LengthBucketSampler(lengths, 64, 8, 7), torch.utils.data.DistributedSampler)
    counts = {len(share) for share in shares}
    assert counts == {len(LengthBucketSampler(lengths, 64, 8, 7, num_replicas=world))}  # equal, as __len__ says
    served = sorted(index for share in shares for batch in share for index in batch)
    assert served == list(range(len(lengths)))  # disjoint and complete: no row repeated or lost


def test_bucketing_lowers_the_padding_share_and_is_recorded() -> None:
    shares = {}
    for buckets in (None, DEFAULT_LENGTH_BUCKETS):
        data = SyntheticDataModule(scale=0.05, batch_size=64, train_format="pairs", length_buckets=buckets)
        data.setup()
        padded = total = 0
        loader = data.train_dataloader()
        for batch in loader if buckets is None else _epoch(loader):
            grid = trim_left_padding(batch[HISTORY])  # what every model does with an unbucketed batch
            slots = padding_slots(grid)
            padded, total = padded + slots[0], total + slots[1]
        shares[buckets] = padded / total
        assert data.describe()["length_buckets"] == buckets
    print(f"padding share: random batches {shares[None]:.3f}, {DEFAULT_LENGTH_BUCKETS} buckets {shares[DEFAULT_LENGTH_BUCKETS]:.3f}")
    assert shares[DEFAULT_LENGTH_BUCKETS] < 0.25 < 0.6 < shares[None]


def test_sequence_batches_hold_equal_target_counts_so_every_target_weighs_alike() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(2, 6, (900,), generator=generator), torch.randint(30, 52, (100,), generator=generator)])
    targets = lengths - 1
    sampler = LengthBucketSampler(lengths, batch_size=32, buckets=8, seed=1, targets=targets)
    batches = sampler.epoch_batches(0)
    assert sorted(int(i) for batch in batches for i in batch) == list(range(len(lengths)))  # each row once
    per_batch = torch.tensor([int(targets[batch].sum()) for batch in batches])
    budget = sampler.target_budget
    assert budget == round(32 * float(targets.double().mean()))
    full = per_batch[per_batch >= budget // 2]
    # every batch but the last holds about one budget of targets (one row can overshoot it)
    assert len(full) >= len(batches) - 1 and bool((full <= budget + int(targets.max())).all())
    # short rows ride in bigger batches: the row count falls with the rows' length
    short = [len(b) for b in batches if int(lengths[b].max()) <= 5]
    long = [len(b) for b in batches if int(lengths[b].min()) >= 30]
    assert short and long and min(short) > 3 * max(long)
    assert len(sampler) == len(batches)
    # pairs view (one target per row): plain batch_size rows, as before
    pairs = LengthBucketSampler(lengths, batch_size=32, buckets=8, seed=1).epoch_batches(0)
    assert sorted(len(b) for b in pairs)[1:] == [32] * (len(pairs) - 1)


@pytest.mark.parametrize("length_buckets", [DEFAULT_LENGTH_BUCKETS, None])
def test_batches_are_pinned_only_for_a_cuda_trainer(length_buckets: int | None) -> None:
    """Page-locked batches when the trainer runs on CUDA (an asynchronous copy; see
    ``SeqRecDataModule.pin_memory``), plain ones otherwise; the flag follows the attached trainer."""
    from types import SimpleNamespace

    data = SyntheticDataModule(
        scale=0.02, batch_size=64, eval_batch_size=100, train_format="sequence", length_buckets=length_buckets
    )
    data.setup()
    assert not data.pin_memory and not data.train_dataloader().pin_memory
    data.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=1, global_rank=0, lightning_module=None
    )
    assert not data.train_dataloader().pin_memory
    data.trainer.strategy.root_device = torch.device("cuda", 0)
    loaders = [data.train_dataloader(), data.val_dataloader(), data.test_dataloader()]
    assert all(loader.pin_memory for loader in loaders)
