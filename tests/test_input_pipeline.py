"""The training input pipeline: batched reads equal item-by-item reads, the same batches whatever the
number of DataLoader workers and with or without the in-memory cache, GPU-side preparation equal to the
CPU's, a dead worker ending training with one line, and the epoch orders. Real HDF5 shards, real merged
files, real DataLoader worker processes."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

import trainkit
from hpcvid.learn.clips import ClipDataset, FrameSequenceDataset, SegmentDataset
from hpcvid.learn.datasets import (Augment, FeatureDataset, FlowDataset, FrameDataset, MergedFeatureSource,
                                   ShardFeatureSource, ShardVideoSource, TwoStreamDataset, VideoItem,
                                   crop_resize, prepare_flow)
from hpcvid.learn.loader import (Batches, Plan, Request, Slots, close_loader, make_loader, reads_in_batches,
                                 train_requests)

torch.set_num_threads(1)
SIZE, FRAMES = 20, 9        # 20 x 20 px, 9 frames (8 flow pairs) per video


def _videos(count: int = 8, seed: int = 0):
    from hpcvid.storage.shards import VideoData

    rng = np.random.default_rng(seed)
    videos = []
    for i in range(count):
        frames = rng.integers(0, 255, (FRAMES - i % 3, SIZE, SIZE, 3), dtype=np.uint8)   # 9, 8 or 7 frames
        flow = rng.normal(scale=4.0, size=(len(frames) - 1, SIZE, SIZE, 2)).astype(np.float32)
        features = rng.normal(size=(len(frames), 6)).astype(np.float32)
        videos.append(VideoData(f"c{i % 2}/v{i}", {"label": i % 2, "class_name": f"c{i % 2}", "split": "train"},
                                np.arange(len(frames)), frames=frames, flow=flow, features={"f": features}))
    return videos


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two extraction shards of 8 short videos (JPEG frames, quantised flow, features "f") and the merged file
    of their features."""
    from hpcvid.launch.sharding import ShardSpec
    from hpcvid.stages.merge import merge
    from hpcvid.storage.shards import write_features_shard, write_shard
    from hpcvid.workfolder import Unit, WorkFolder

    root = tmp_path_factory.mktemp("pipeline")
    videos = _videos()
    paths = [root / "shard-0000-of-0002.h5", root / "shard-0001-of-0002.h5"]
    for k, path in enumerate(paths):
        write_shard(path, videos[k::2], kind="hpcvid.extract")
    work = WorkFolder(root / "work")
    unit = Unit("features", "f")
    shard_set = work.declare_set(unit, 1, {"f": 1})
    write_features_shard(work.unit_dir(unit), ShardSpec(0, 1), videos, record_extra={"set": shard_set.id})
    merge(work.root, features_dir=work.unit_dir(unit))
    shard_of = {v.video_id: str(paths[k % 2]) for k, v in enumerate(videos)}
    items = [VideoItem(v.video_id, int(v.attrs["label"]), len(v.frame_indices)) for v in videos]
    return shard_of, items, paths, work.merged_file(unit)


def _datasets(shards, train: bool = True) -> dict[str, object]:
    """One dataset of each kind over the shards (augmented when training), each with its own sources."""
    shard_of, items, paths, merged = shards
    augment = Augment(scales=(1.0, 0.75, 0.5))
    features = ShardFeatureSource(paths, "f")
    features.fit_statistics(features.items)
    return {
        "frame": FrameDataset(ShardVideoSource(shard_of), items, train=train, seed=3, augment=augment),
        "flow": FlowDataset(ShardVideoSource(shard_of), items, stack=5, train=train, seed=3, augment=augment),
        "twostream": TwoStreamDataset(ShardVideoSource(shard_of), items, stack=10, train=train, seed=3,
                                      augment=augment),      # stack 10 > 8 pairs: ping-pong padded
        "lstm": FeatureDataset(features, features.items, seq_len=8, train=train, seed=3),
        "merged": FeatureDataset(MergedFeatureSource(merged, "f"), MergedFeatureSource(merged, "f").items,
                                 seq_len=8, train=train, seed=3),
    }


def _item_datasets(shards, train: bool = True) -> dict[str, object]:
    """The segment, clip and frame-sequence models' datasets (read item by item), each with its own source."""
    shard_of, items, _, _ = shards
    augment = Augment(scales=(1.0, 0.75, 0.5))
    return {
        "tsn_diff": SegmentDataset(ShardVideoSource(shard_of), items, modality="diff", segments=3, stack=3,
                                   train=train, seed=3, augment=augment),
        "tsn_flow": SegmentDataset(ShardVideoSource(shard_of), items, modality="flow", segments=3, stack=3,
                                   train=train, seed=3, augment=augment),
        "c3d": ClipDataset(ShardVideoSource(shard_of), items, length=4, crop=0.8, train=train, seed=3, flip=True),
        "cnnlstm": FrameSequenceDataset(ShardVideoSource(shard_of), items, length=4, train=train, seed=3,
                                        augment=augment),
    }


def _all_batches(shards, workers: int, cache: bool, epochs: int = 2) -> list[tuple[str, int, list[torch.Tensor]]]:
    """Every batch of every dataset in ``epochs`` epochs through the trainer's loader."""
    from hpcvid.learn.cache import cache_inputs

    datasets = {**_datasets(shards), **_item_datasets(shards)}
    if cache:
        assert cache_inputs(list(datasets.values()), 1.0)["cached"]
    requests = [r._replace(part=name) for epoch in range(epochs) for name, dataset in datasets.items()
                for r in train_requests(len(dataset), batch=3, epoch=epoch, seed=3)]
    # batches come back through shared slots, as in the trainer: as few as the DataLoader's prefetching allows
    slots = Slots(workers * 2 + 1, 300_000) if workers else None
    loader = make_loader(Batches(datasets, prepare=True, slots=slots), Plan(lambda: iter(requests)), workers=workers,
                         prefetch=2, pin_memory=False, seed=0)
    out = []
    try:
        batches = iter(loader)
        for r in requests:
            datasets[r.part].set_epoch(r.epoch)   # as the trainer does; workers forked earlier never see it
            batch = next(batches)
            assert workers == 0 or type(batch).__name__ == "InSlot"
            out.append((r.part, r.epoch, list(batch if slots is None else slots.take(batch))))
    finally:
        close_loader(loader)
    return out


@pytest.mark.slow
def test_the_same_batches_with_0_1_2_workers_and_with_the_cache(shards):
    reference = _all_batches(shards, workers=0, cache=False)
    per_epoch = (len(_datasets(shards)) + len(_item_datasets(shards))) * 3    # 3 batches of 3 (8 videos) each
    assert len(reference) == 2 * per_epoch
    for workers, cache in ((1, False), (2, False), (0, True), (2, True)):
        batches = _all_batches(shards, workers=workers, cache=cache)
        assert [(n, e) for n, e, _ in batches] == [(n, e) for n, e, _ in reference]
        for (name, epoch, got), (_, _, expected) in zip(batches, reference):
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (name, epoch, workers, cache)
    # and the epochs differ: the windows, frames and crops are drawn per (seed, epoch, index)
    first, second = reference[0][2][0], reference[per_epoch][2][0]
    assert not torch.equal(first, second)


def test_a_batch_equals_its_samples_read_one_by_one(shards):
    """dataset.batch (one read per video, crops of one size resized together) == dataset[i] stacked, and the
    sources' batched reads == their one-video reads."""
    datasets = _datasets(shards)
    for name, dataset in datasets.items():
        indices = [5, 0, 3, 7, 1, 6]
        *inputs, labels = dataset.batch(indices)
        for k, i in enumerate(indices):
            *one, label = dataset[i]
            assert label == int(labels[k])
            assert all(torch.equal(a[k], b) for a, b in zip(inputs, one)), (name, i)
        assert reads_in_batches(dataset)
    shard_of, items, paths, merged = shards
    source = ShardVideoSource(shard_of)
    frame_requests = [(items[3].id, [2, 0, 2]), (items[0].id, [1]), (items[6].id, [0, 1, 2, 3])]
    for got, (vid, indices) in zip(source.frames_batch(frame_requests), frame_requests):
        assert np.array_equal(got, source.frames(vid, indices))
    flow_requests = [(items[4].id, 2, 6), (items[1].id, 0, 3)]
    for got, (vid, start, stop) in zip(source.flow_batch(flow_requests), flow_requests):
        assert got.values.dtype == np.uint8 and np.array_equal(got.pixels(), source.flow(vid, start, stop))
    for name in ("lstm", "merged"):
        features = datasets[name].source
        windows = [(5, 1, 4), (0, 0, 6), (1, 2, 3), (4, 0, 7)]
        for got, (index, start, length) in zip(features.windows(windows), windows):
            assert np.array_equal(got, features.window(index, start, length))


def test_one_sample_helpers_are_the_batched_operations():
    """prepare_flow and crop_resize (what evaluation calls) give what the batched path gives each sample."""
    from hpcvid.learn.preparation import compensate_camera_batch, crop_resize_batch, dequantise_flow, stack_flow

    rng = np.random.default_rng(1)
    flow = rng.normal(size=(3, 4, 8, 6, 2)).astype(np.float32)
    batch = stack_flow(compensate_camera_batch(torch.from_numpy(flow)))
    assert all(np.array_equal(prepare_flow(flow[k]), batch[k].numpy()) for k in range(3))
    # numpy's median: the mean of the two middle values of the 48 displacements
    assert np.allclose(compensate_camera_batch(torch.from_numpy(flow))[0].numpy(),
                       flow[0] - np.median(flow[0], axis=(1, 2), keepdims=True), atol=1e-6)
    # the median of quantised flow, counted over its 256 codes, is the median selected among its pixels
    for height, width in ((8, 6), (5, 3)):                    # an even and an odd number of displacements
        codes = torch.from_numpy(rng.integers(0, 256, (3, 4, height, width, 2), dtype=np.uint8))
        scale, offset = torch.tensor([0.15, 0.2, 0.3]), torch.tensor([19.0, 25.5, 38.0])
        pixels = dequantise_flow(codes, scale, offset)
        counted = compensate_camera_batch(pixels, "median", codes, scale, offset)
        assert torch.equal(counted, compensate_camera_batch(pixels, "median"))
        assert np.array_equal(counted.numpy(), pixels.numpy() - np.median(pixels.numpy(), axis=(2, 3), keepdims=True))
    boxes = torch.tensor([[0, 0, 6, 6, 1], [2, 0, 6, 4, 0], [1, 0, 6, 6, 0]])     # two crops of one size
    images = torch.from_numpy(rng.normal(size=(3, 4, 8, 6)).astype(np.float32))
    together = crop_resize_batch(images, boxes, flow_channels=True)
    for k in range(3):
        assert torch.equal(together[k], crop_resize(images[k], tuple(boxes[k].tolist()), flow_channels=True))


def test_a_filled_cache_serves_reads_without_the_files(shards, tmp_path):
    import shutil

    from hpcvid.learn.cache import CachedVideoSource, RowCache

    shard_of, items, paths, _ = shards
    copies = {vid: str(tmp_path / os.path.basename(path)) for vid, path in shard_of.items()}
    for path in paths:
        shutil.copy(path, tmp_path / path.name)
    flow = FlowDataset(ShardVideoSource(copies), items, stack=5, train=False)
    diff = SegmentDataset(ShardVideoSource(copies), items, modality="diff", segments=3, stack=3, train=False)
    expected = {}
    for name, dataset in (("flow", flow), ("diff", diff)):
        dataset.use_cache(RowCache(dataset.cache_layout()))
        expected[name] = [dataset[i] for i in range(len(items))]      # reads the files and fills the cache
        dataset.source.source.close()
    for path in paths:
        os.remove(tmp_path / path.name)
    for name, dataset in (("flow", flow), ("diff", diff)):
        again = [dataset[i] for i in range(len(items))]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(again, expected[name])), name
        assert isinstance(dataset.source, CachedVideoSource)


def test_a_set_over_the_budget_is_not_cached(shards):
    from hpcvid.learn.cache import cache_inputs

    datasets = [*_datasets(shards).values(), *_item_datasets(shards).values()]
    decided = cache_inputs(datasets, budget_gb=1e-6)
    assert not decided["cached"] and "over train.cache_gb" in decided["why"]
    assert not any(type(d.source).__name__.startswith("Cached") for d in datasets)


NO_GPU = "needs a CUDA GPU: the GPU-side preparation is compared with the workers' on a GPU node"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_GPU))])
def test_inputs_prepared_by_the_training_process_equal_the_workers(shards, device):
    """What training on a GPU hands over (JPEG bytes, stored flow), decoded and prepared on ``device``, equals
    what a worker prepares on the CPU (the CPU run checks the handing over; the GPU run the GPU's numbers)."""
    for name, dataset in _datasets(shards).items():
        indices = [4, 1, 6, 0]
        expected = dataset.batch(indices, epoch=1)
        dataset.decode_later = True
        raw = dataset.load_batch(indices, epoch=1)
        assert ("jpeg" in raw) == (name in ("frame", "twostream"))
        got = dataset.prepare_batch(raw, torch.device(device))
        for a, b in zip(got, expected):
            assert a.device.type == device
            # nvJPEG's IDCT may differ from libjpeg-turbo's by a level or two: ~0.05 after normalisation
            images = a.ndim == 4 and a.shape[1] == 3
            torch.testing.assert_close(a.cpu(), b, atol=0.1 if images else 1e-4, rtol=1e-4)


class _DyingFlowDataset(FlowDataset):
    """Kills the DataLoader worker that loads its third batch (as the kernel's out-of-memory killer would)."""

    def load_batch(self, indices, epoch=None):
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None and 2 in indices:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load_batch(indices, epoch)


def _dying_data(config):
    bundle = trainkit.video_data(config)
    bundle.train = _DyingFlowDataset(bundle.train.source, bundle.train.items, stack=bundle.train.stack,
                                     train=True, seed=config.train.seed)
    return bundle


@pytest.mark.timeout(120)
def test_a_dead_worker_ends_training_with_one_line_naming_it(tmp_path):
    from hpcvid.config import resolve_config
    from hpcvid.errors import ResourceError
    from hpcvid.learn.trainer import train

    config = resolve_config(overrides={
        "work": str(tmp_path), "train.model": "flow", "train.backbone": "small", "train.flow_stack": 3,
        "train.epochs": 1, "train.batch_size": 2, "train.device": "cpu", "train.workers": 1})
    with pytest.raises(ResourceError) as raised:
        train(config, data_factory=_dying_data)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("DataLoader worker 0 (pid ")
    assert "died while loading training batches of epoch 1" in message and "train.workers" in message


def test_a_subclass_with_its_own_getitem_is_read_item_by_item(shards):
    """Its __getitem__ (the sample its author meant) is what the loader calls, in workers too."""
    class Doubled(FrameDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return image * 2, label

    shard_of, items, _, _ = shards
    dataset = Doubled(ShardVideoSource(shard_of), items, train=False)
    assert not reads_in_batches(dataset) and reads_in_batches(FrameDataset(ShardVideoSource(shard_of), items, train=False))
    requests = train_requests(len(dataset), batch=4, epoch=0, seed=0)
    loader = make_loader(Batches({"train": dataset}, prepare=True), Plan(lambda: iter(requests)), workers=1,
                         prefetch=1, pin_memory=False, seed=0)
    try:
        images, labels = next(iter(loader))
    finally:
        close_loader(loader)
    first = requests[0].indices[0]
    assert torch.equal(images[0], dataset[first][0]) and torch.equal(images[0], 2 * FrameDataset.__getitem__(dataset, first)[0])


def test_epoch_orders_see_every_sample_once():
    """The global shuffle is torch's DistributedSampler's; the block shuffle keeps storage neighbours together;
    both give each rank a disjoint share of every sample in each epoch, and a resumed epoch skips its start."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=4)
    sampler.set_epoch(3)
    requests = train_requests(10, batch=2, epoch=3, seed=4, world=2, rank=1)
    assert [i for r in requests for i in r.indices] == list(sampler)
    assert [i for r in train_requests(10, batch=2, epoch=3, seed=4, world=2, rank=1, skip=3)
            for i in r.indices] == list(sampler)[3:]
    storage = [7, 3, 9, 0, 1, 8, 2, 6, 4, 5, 11, 10]          # where each sample lies, in file order
    for epoch in range(3):
        ranks = [[i for r in train_requests(12, batch=3, epoch=epoch, seed=0, world=2, rank=rank,
                                            storage_order=storage, block=4) for i in r.indices] for rank in (0, 1)]
        assert sorted(ranks[0] + ranks[1]) == list(range(12))
        together = [i for pair in zip(*ranks) for i in pair]   # the global order, interleaved back
        blocks = [set(storage[b:b + 4]) for b in range(0, 12, 4)]
        assert all(set(together[b:b + 4]) in blocks for b in range(0, 12, 4))    # whole blocks, shuffled
    orders = [[i for r in train_requests(12, batch=3, epoch=e, seed=0, storage_order=storage, block=4)
               for i in r.indices] for e in range(6)]
    assert len({frozenset(order[:4]) for order in orders}) > 1          # the blocks' order changes
    arrangements: dict[frozenset, set] = {}
    for order in orders:
        for b in range(0, 12, 4):
            arrangements.setdefault(frozenset(order[b:b + 4]), set()).add(tuple(order[b:b + 4]))
    assert any(len(seen) > 1 for seen in arrangements.values())        # and so does a block's content


def test_default_workers_follow_the_cores_of_the_task(monkeypatch):
    from hpcvid.config import resolve_config
    from hpcvid.launch.executors import usable_cores
    from hpcvid.learn.loader import training_threads, worker_count

    def config(**extra):
        return resolve_config(overrides={"train.workers": -1, **extra})

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count(config(), 1, on_gpu=True) == max(1, usable_cores() - 1)
    assert worker_count(config(), 1, on_gpu=False) == max(1, usable_cores() // 4)
    assert worker_count(config(), 64, on_gpu=True) == 1                # never fewer than one
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    slurm = config(**{"launch.executor": "slurm", "launch.cpus_per_task": 12})
    assert worker_count(slurm, 4, on_gpu=True) == 11 and worker_count(slurm, 4, on_gpu=False) == 3
    assert training_threads(12, 3) == 9 and training_threads(2, 4) == 1
    assert worker_count(config(**{"train.workers": 3}), 1, on_gpu=False) == 3


class _Numbered:
    """Sample ``i`` is a vector of ``i``s (read item by item)."""

    def __len__(self) -> int:
        return 1000

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4096,), float(index))


class _CountingBatches(Batches):
    """Batches that count the requests written into their slots (one worker: in order)."""

    def __init__(self, *args, done, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done = done

    def __getitem__(self, request):
        batch = super().__getitem__(request)
        self.done.value = request.number + 1
        return batch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_a_lent_batch_stays_intact_until_the_second_batch_after_it(prefetch):
    """The trainer uses batches where the worker wrote them (no copy): each must hold until its step is done,
    that is while the next batch comes, even when the workers have written every request dispatched."""
    import multiprocessing
    import time

    done = multiprocessing.get_context("fork").Value("i", 0)
    count = 12
    slots = Slots.for_loader(1, prefetch, 4096 * 4)
    requests = [Request("train", 0, (n,)) for n in range(count)]
    batches = _CountingBatches({"train": _Numbered()}, prepare=True, slots=slots, done=done)
    loader = make_loader(batches, Plan(lambda: iter(requests)), workers=1, prefetch=prefetch, pin_memory=False,
                         seed=0)
    start = torch.frombuffer(slots._memory, dtype=torch.uint8).data_ptr()
    held: list[tuple[int, torch.Tensor]] = []
    try:
        stream = iter(loader)
        for n in range(count):
            batch = slots.lend(next(stream))
            assert start <= batch.data_ptr() < start + len(slots._memory)     # where the worker wrote it
            held = [*held[-1:], (n, batch)]
            while done.value < min(n + 1 + prefetch, count):   # every request dispatched so far is written
                time.sleep(0.01)
            for number, lent in held:
                assert torch.equal(lent, torch.full((1, 4096), float(number))), (number, n)
    finally:
        close_loader(loader)
