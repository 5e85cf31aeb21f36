"""The DALI loaders on real JPEGs, CPU decoder."""
import re

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from conftest import decode_identity
from dali_ba import BatchAugmentLoader, ValidationLoader, flatten_views, normalize
from dali_ba.data.dataset import load_dataset
from dali_ba.errors import UsageError


def collect(batches):
    """Materialise an epoch (yielded tensors are only valid until the next batch)."""
    return [(x.clone(), y.clone()) for x, y in batches]


def test_train_batch_shapes_dtypes_and_layout(demo_data):
    loader = BatchAugmentLoader(demo_data / "train", batch_size=6, views=3, view_size=40, num_threads=1)
    batches = collect(loader.epoch(0))
    assert len(batches) == len(loader) == -(-240 // 6)
    images, labels = batches[0]
    assert images.shape == (6, 3, 3, 40, 40) and images.dtype == torch.uint8
    assert labels.shape == (6,) and labels.dtype == torch.int64
    assert images.stride()[2:] == (1, 40 * 3, 3)  # (3, H, W) view of NHWC memory: no copy was made
    x, y = flatten_views(images, labels)
    assert x.shape == (18, 3, 40, 40) and torch.equal(y, labels.repeat_interleave(3))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[4], images[1, 1])  # copies of a sample stay adjacent
    z = normalize(x)
    assert z.dtype == torch.float32 and z.is_contiguous(memory_format=torch.channels_last)
    assert -3 < z.min() < 0 < z.max() < 3


def test_single_view_equals_a_plain_single_view_pipeline(demo_data):
    loader = BatchAugmentLoader(demo_data / "train", batch_size=8, views=1, view_size=32, num_threads=1, seed=3)
    ours = collect(loader.epoch(0))
    order = loader.shard(0)
    files = np.array(loader.dataset.files)[order].tolist()
    labels = np.array(loader.dataset.labels)[order].tolist()

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=loader.pipeline_seed(0))
    def plain():
        jpegs, label = fn.readers.file(files=files, labels=labels, name="r")
        image = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        image = fn.random_resized_crop(image, size=(32, 32), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3))
        return fn.flip(image, horizontal=fn.random.coin_flip()), label

    pipe = plain()
    pipe.build()
    for images, lab in ours[:5]:
        expected, expected_labels = pipe.run()
        expected = torch.from_numpy(np.array(expected.as_tensor())).permute(0, 3, 1, 2)
        assert torch.equal(images[:, 0], expected)
        assert lab.tolist() == np.array(expected_labels.as_tensor()).ravel().tolist()


def test_views_come_from_one_image_but_differ(identity_list):
    file_list, n = identity_list
    loader = BatchAugmentLoader(file_list, batch_size=5, views=4, view_size=32, crop_area_min=0.1, num_threads=1)
    for images, labels in collect(loader.epoch(0)):
        ids = decode_identity(images)  # (B, M): which file each view shows, from its pixels
        assert (ids == labels[:, None].numpy()).all()  # every view of a sample shows that sample's file
        for views in images:
            pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
            assert all(not torch.equal(views[a], views[b]) for a, b in pairs)


def graph_edges(loader, views):
    loader.views = views
    pipe = loader.build_pipeline(0)
    pipe.build()
    path = f"/tmp/dali_ba_graph_{views}.dot"
    pipe.save_graph_to_dot_file(path)
    return re.findall(r"^(\S+) -> (\S+);", open(path).read(), re.M)


@pytest.mark.parametrize("views", [1, 4, 8])
def test_one_decode_per_sample_whatever_m(demo_data, views):
    loader = BatchAugmentLoader(demo_data / "train", batch_size=4, views=1, view_size=32, num_threads=1)
    edges = graph_edges(loader, views)
    nodes = {n for edge in edges for n in edge}
    decoders = [n for n in nodes if n.startswith("__Image")]
    assert len(decoders) == 1  # one decoder operator in the built graph...
    reader_edges = [b for a, b in edges if a == "reader" and b.startswith("__Image")]
    assert reader_edges == decoders  # ...fed once by the reader...
    crops = [b for a, b in edges if a == decoders[0]]
    assert len(crops) == views and all(c.startswith("__RandomResizedCrop") for c in crops)  # ...feeding M views


def test_two_ranks_get_disjoint_shards_covering_the_data(identity_list):
    file_list, n = identity_list  # 20 samples, 2 ranks x batch 5: divides evenly
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = BatchAugmentLoader(file_list, batch_size=5, views=2, view_size=24, rank=rank, world_size=2,
                                        seed=11, num_threads=1)
            ranks_ids = [decode_identity(x)[:, 0] for x, _ in collect(loader.epoch(epoch))]
            seen.append(np.concatenate(ranks_ids))
        assert set(seen[0]).isdisjoint(seen[1])
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))
    assert not np.array_equal(loader.shard(0), loader.shard(1))  # reshuffled each epoch


@pytest.mark.parametrize("batch", [3, 4, 20])
def test_validation_sees_every_sample_once_across_two_ranks(identity_list, batch):
    file_list, n = identity_list
    dataset = load_dataset(file_list)
    subset = type(dataset)(dataset.files[:13], dataset.labels[:13], dataset.classes, dataset.source)  # 13: odd
    seen = []
    for rank in (0, 1):
        loader = ValidationLoader(subset, batch_size=batch, resize=40, crop=32, rank=rank, world_size=2, num_threads=1)
        for images, labels in collect(loader):
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            assert (decode_identity(images) == labels.numpy()).all()
            seen += labels.tolist()
    assert sorted(seen) == list(range(13))


def test_bad_loader_arguments(demo_data):
    train = demo_data / "train"
    with pytest.raises(UsageError, match="views must be >= 1"):
        BatchAugmentLoader(train, batch_size=4, views=0)
    with pytest.raises(UsageError, match="batch_size must be >= 1"):
        BatchAugmentLoader(train, batch_size=0)
    with pytest.raises(UsageError, match="unknown augment 'nope'"):
        BatchAugmentLoader(train, batch_size=4, augment="nope")
    with pytest.raises(UsageError, match="240 samples but there are 300 ranks"):
        BatchAugmentLoader(train, batch_size=4, rank=0, world_size=300)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="needs a visible GPU"):
            BatchAugmentLoader(train, batch_size=4, decoder="mixed")
    with pytest.raises(UsageError, match="decoder must be one of"):
        BatchAugmentLoader(train, batch_size=4, decoder="gpu")
