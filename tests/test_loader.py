"""The DALI loaders on real JPEGs, CPU decoder."""

import itertools
import os
import re

import numpy as np
import pytest
import torch
from conftest import decode_identity
from PIL import Image

from dali_ba import BatchAugmentLoader, ValidationLoader, flatten_views, normalize
from dali_ba.data.dataset import load_dataset
from dali_ba.errors import UsageError
from dali_ba.loading.feed import MIXED_DECODE_TOLERANCE

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it


def collect(batches):
    """Materialise an epoch (yielded tensors are only valid until the next batch)."""
    return [(x.clone(), y.clone()) for x, y in batches]


def test_a_forked_child_never_destroys_what_it_inherited():
    """A DataLoader worker forked after DALI pipelines ran must not collect them: DALI's shutdown
    there waits for threads the child does not have (dali_ba.loading.feed freezes the inherited heap
    at each fork). Garbage left in a cycle before the fork stays undestroyed in the child's collection
    and is destroyed in the parent's."""
    import gc
    import multiprocessing

    import dali_ba.loading.feed  # noqa: F401  # registers the fork hook

    destroyed_in = multiprocessing.get_context("fork").SimpleQueue()

    class Pipelineish:
        def __init__(self) -> None:
            self.me = self  # a cycle: freed by the collector only

        def __del__(self) -> None:
            destroyed_in.put(os.getpid())

    gc.disable()
    try:
        Pipelineish()
        child = multiprocessing.get_context("fork").Process(target=gc.collect)
        child.start()
        child.join(60)
        assert child.exitcode == 0
        gc.collect()
    finally:
        gc.enable()
    assert [destroyed_in.get()] == [os.getpid()] and destroyed_in.empty()  # once, here


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


@pytest.mark.parametrize("augment, tolerance", [("imagenet", 2), ("cifar", 0)])
def test_dali_and_torch_views_render_the_same_parameters(identity_list, augment, tolerance):
    """The GPU path's DALI graph, run on CPU, against the CPU path's torch stage: same boxes, flips,
    holes; the two bilinear antialiased resamplers differ only in rounding."""
    file_list, _ = identity_list
    loader = BatchAugmentLoader(file_list, batch_size=5, views=4, view_size=32, augment=augment, num_threads=1, seed=3)
    torch_views = collect(loader.epoch(1, stage="torch"))
    dali_views = collect(loader.epoch(1, stage="dali"))
    assert len(torch_views) == len(dali_views) == 4
    mixed = loader.decoder == "mixed"  # the torch stage decodes on the CPU, the DALI one on the GPU: rounding differs
    tolerance += MIXED_DECODE_TOLERANCE if mixed else 0
    for (ours, labels), (theirs, their_labels) in zip(torch_views, dali_views):
        assert torch.equal(labels, their_labels)
        difference = (ours.float() - theirs.float()).abs()
        assert difference.max() <= tolerance and (mixed or difference.mean() < 0.25)
        mirrored = (ours.float() - theirs.flip(-1).float()).abs().mean(dim=(2, 3, 4))
        assert (mirrored > 2).all()  # a mirror (or any other box) would show


def test_the_gpu_paths_header_sizes_follow_exif_rotation(tmp_path):
    """The DALI graph draws boxes before decoding, from file headers: rotated JPEGs must give the
    decoded (rotated) size, or its views would leave the torch stage's."""
    from conftest import identity_image

    lines = []
    for i, orientation in enumerate([1, 6, 8, 3, 5, 7]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        identity_image(i, 90, 50).save(tmp_path / f"{i}.jpg", quality=95, subsampling=0, exif=exif)
        lines.append(f"{i}.jpg {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    loader = BatchAugmentLoader(tmp_path / "list.txt", batch_size=6, views=3, view_size=24, num_threads=1)
    ((ours, _),) = collect(loader.epoch(0))
    ((theirs, _),) = collect(loader.epoch(0, stage="dali"))
    assert (ours.float() - theirs.float()).abs().max() <= 2
    whole = BatchAugmentLoader(
        tmp_path / "list.txt", batch_size=6, views=3, view_size=24, num_threads=1, roi_decode=False
    )
    ((of_whole_images, _),) = collect(whole.epoch(0))
    assert torch.equal(ours, of_whole_images)  # DALI's ROI decode turns the region as it turns the image


@pytest.mark.parametrize("stage", ["dali", "torch"])
def test_a_header_that_disagrees_with_the_decoder_cuts_or_pads_the_image(tmp_path, stage):
    """The DALI graph takes each image's size from its header, as the reader stage read it, never from
    the decoder (on the mixed decoder a CPU operator waiting on the GPU every batch). Where the two
    disagree, its views are those of the decoded image cut or zero-padded to the header's size, bit
    for bit (lossless PNGs), boxes wholly outside the decoded image included: DALI's CPU resize
    crashes on such a ROI, and its ROI decoders on a region past the image."""
    from conftest import identity_image

    headers = {}
    for i in range(8):
        image = np.asarray(identity_image(i, 60 + 9 * i, 50 + 4 * i))
        h, w = image.shape[:2]
        header = [(3 * h, 2 * w), (h // 2, 2 * w // 3), (h, w), (h // 3, 3 * w)][i % 4]  # larger, smaller, equal, both
        cut = np.zeros((*header, 3), dtype=np.uint8)
        cut[:h, :w] = image[: header[0], : header[1]]
        for folder, pixels in (("decoded", image), ("header", cut)):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.png")
        headers[f"{i}.png"] = header
    for folder in ("decoded", "header"):
        (tmp_path / folder / "list.txt").write_text("".join(f"{name} {name[0]}\n" for name in headers))
    args = dict(batch_size=4, views=6, view_size=24, num_threads=1, seed=2)
    told = BatchAugmentLoader(tmp_path / "decoded" / "list.txt", **args)
    files = [os.path.basename(told.dataset.files[i]) for i in range(len(told.dataset))]
    told.sizes[:] = [headers[name] for name in files]  # as if read in headers that disagree with the decoder
    honest = BatchAugmentLoader(tmp_path / "header" / "list.txt", **args)  # files of the headers' sizes
    ours, theirs = collect(told.epoch(0, stage=stage)), collect(honest.epoch(0, stage=stage))
    assert len(ours) == len(theirs) == 2
    for (images, labels), (expected, their_labels) in zip(ours, theirs):
        assert torch.equal(labels.cpu(), their_labels.cpu()) and torch.equal(images.cpu(), expected.cpu())
    views = torch.cat([images.cpu() for images, _ in ours]).flatten(2)
    assert (views.amax(dim=-1) == 0).any()  # some boxes lay wholly outside their decoded image


@pytest.mark.parametrize("augment, views", [("imagenet", 1), ("imagenet", 4), ("cifar", 2), ("trivial", 3)])
def test_decoding_only_the_views_region_changes_no_view(demo_data, augment, views):
    """Each sample's region (the union of its M boxes) is all that is decoded. Torch's stage (which
    decodes on the CPU) then makes the views of the whole image bit for bit: libjpeg-turbo decodes a
    region of a 4:2:0 JPEG as the whole image has it. DALI's resize reads a little past a box (its
    filter's reach), where torchvision's crop stops at the box: at a region's edge it now stops too,
    so DALI's views come no further from torch's than when the whole image is decoded."""
    from dali_ba.loading.augment import view_regions

    args = dict(batch_size=4, views=views, view_size=32, augment=augment, num_threads=1, seed=5)
    regions = BatchAugmentLoader(demo_data / "train", **args)
    whole = BatchAugmentLoader(demo_data / "train", roi_decode=False, **args)
    seen = {}
    for stage in ("torch", "dali"):
        for name, loader in (("regions", regions), ("whole", whole)):
            seen[stage, name] = collect(itertools.islice(loader.epoch(1, stage=stage), 3))
    for (x, y), (ex, ey) in zip(seen["torch", "regions"], seen["torch", "whole"], strict=True):
        assert torch.equal(y, ey) and torch.equal(x, ex)

    def from_torch(name):
        pairs = zip(seen["dali", name], seen["torch", "whole"], strict=True)
        return torch.cat([(x.float() - ex.float()).abs().flatten() for (x, _), (ex, _) in pairs]).mean()

    assert from_torch("regions") <= from_torch("whole") + 0.01
    assert all(torch.equal(y, ey) for (_, y), (_, ey) in zip(seen["dali", "regions"], seen["torch", "whole"]))
    pipe = regions.build_pipeline(1, stage="torch")  # what torch's stage is handed: the regions alone
    pipe.build()
    images = pipe.run()[0]
    order = regions.shard(1)[:4]
    drawn = regions.augmentation.draw(1, order, regions.sizes[order], views)
    expected, _ = view_regions(drawn.boxes, regions.sizes[order])
    assert [np.asarray(images[i]).shape[:2] for i in range(4)] == [tuple(r[2:]) for r in expected.tolist()]
    if augment == "imagenet" and views == 1:
        assert (expected[:, 2] * expected[:, 3] < regions.sizes[order].prod(axis=1)).all()


def test_views_follow_their_drawn_parameters(identity_list):
    """View m of sample i is torchvision's resized crop + flip of the decoded image, boxes from augment.py."""
    from torchvision.transforms.v2 import functional as F

    file_list, _ = identity_list
    loader = BatchAugmentLoader(file_list, batch_size=5, views=3, view_size=24, num_threads=1, seed=4)
    order = loader.shard(0)
    images, labels = collect(loader.epoch(0))[1]
    decoded = [torch.from_numpy(np.array(Image.open(loader.dataset.files[i]).convert("RGB"))) for i in order[5:10]]
    params = loader.augmentation.draw(0, order[5:10], [d.shape[:2] for d in decoded], 3)
    assert labels.tolist() == order[5:10].tolist()  # identity list: label = index
    for b, image in enumerate(decoded):
        for m in range(3):
            top, left, height, width = params.boxes[b, m].tolist()
            expected = F.resized_crop(image.permute(2, 0, 1), top, left, height, width, [24, 24], antialias=True)
            expected = F.horizontal_flip(expected) if params.flips[b, m] else expected
            assert (
                images[b, m].cpu().float() - expected.float()
            ).abs().mean() < 1.5  # PIL's and DALI's JPEG decoders differ a little


@pytest.mark.parametrize("stage", ["torch", "dali"])
def test_views_come_from_one_image_but_differ(identity_list, stage):
    file_list, n = identity_list
    loader = BatchAugmentLoader(file_list, batch_size=5, views=4, view_size=32, crop_area_min=0.1, num_threads=1)
    for images, labels in collect(loader.epoch(0, stage=stage)):
        ids = decode_identity(images)  # (B, M): which file each view shows, from its pixels
        assert (ids == labels[:, None].cpu().numpy()).all()  # every view of a sample shows that sample's file
        for views in images:
            pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
            assert all(not torch.equal(views[a], views[b]) for a, b in pairs)


def graph_edges(loader, views, stage):
    loader.views = views
    pipe = loader.build_pipeline(0, stage=stage)
    pipe.build()
    path = f"/tmp/dali_ba_graph_{views}_{stage}.dot"
    pipe.save_graph_to_dot_file(path)
    return re.findall(r"^(\S+) -> (\S+);", open(path).read(), re.M)


@pytest.mark.parametrize("views", [1, 4, 8])
def test_one_decode_per_sample_whatever_m(demo_data, views):
    loader = BatchAugmentLoader(demo_data / "train", batch_size=4, views=1, view_size=32, num_threads=1)
    for stage, view_nodes in (("dali", views), ("torch", 0)):  # torch's stage gets each decoded image once
        edges = graph_edges(loader, views, stage)
        nodes = {n for edge in edges for n in edge}
        decoders = [n for n in nodes if n.startswith("__Image")]
        assert len(decoders) == 1  # one decoder operator in the built graph...
        reader_edges = [b for a, b in edges if a.startswith("__ExternalSource") and b.startswith("__Image")]
        assert reader_edges == decoders  # ...fed once by the reader stage's source...
        assert decoders[0].startswith("__ImageSlice")  # ...decoding only the region its views read...
        cuts = [b for a, b in edges if a == decoders[0] and b.startswith("__Slice")]  # padded to the region
        assert len(cuts) == (stage == "dali")  # (torch's views pad by themselves)
        resizes = [b for a, b in edges if a in cuts and b.startswith("__Resize")]
        assert len(resizes) == view_nodes  # ...feeding M views in DALI's graph, none in torch's
    images, _ = next(iter(loader.epoch(0)))
    assert images.shape[:2] == (4, views)


def test_two_ranks_get_disjoint_shards_covering_the_data(identity_list):
    file_list, n = identity_list  # 20 samples, 2 ranks x batch 5: divides evenly
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = BatchAugmentLoader(
                file_list, batch_size=5, views=2, view_size=24, rank=rank, world_size=2, seed=11, num_threads=1
            )
            ranks_ids = [decode_identity(x)[:, 0] for x, _ in collect(loader.epoch(epoch))]
            seen.append(np.concatenate(ranks_ids))
        assert set(seen[0]).isdisjoint(seen[1])
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))
    assert not np.array_equal(loader.shard(0), loader.shard(1))  # reshuffled each epoch


def test_the_same_augmentations_whatever_the_number_of_ranks(identity_list):
    """Views of sample i in epoch e depend on (seed, e, i) only: 1 rank and 2 ranks see the same ones."""
    file_list, n = identity_list
    seen = {}
    for world in (1, 2):
        views = {}
        for rank in range(world):
            loader = BatchAugmentLoader(
                file_list,
                batch_size=10 // world,
                views=3,
                view_size=24,
                rank=rank,
                world_size=world,
                seed=7,
                num_threads=1,
            )
            for images, labels in collect(loader.epoch(2)):
                views.update(zip(labels.tolist(), images))
        seen[world] = views
    assert sorted(seen[1]) == sorted(seen[2]) == list(range(n))
    if loader.decoder == "cpu":
        assert all(torch.equal(seen[1][i], seen[2][i]) for i in range(n))
    else:  # a GPU's hybrid decoder may round a sample differently at another place in its batch
        assert all((seen[1][i].int() - seen[2][i].int()).abs().max() <= MIXED_DECODE_TOLERANCE for i in range(n))


def test_resume_mid_epoch_is_bit_identical(demo_data):
    loader = BatchAugmentLoader(demo_data / "train", batch_size=8, views=2, view_size=32, num_threads=2, seed=9)
    whole = collect(loader.epoch(1))
    batches = loader.epoch(1)
    collect(next(batches) for _ in range(4))
    state = loader.state()
    assert state == {"epoch": 1, "batches": 4}
    again = BatchAugmentLoader(demo_data / "train", batch_size=8, views=2, view_size=32, num_threads=1, seed=9)
    rest = collect(again.epoch(1, state))
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(x, y) and torch.equal(a, b) for (x, a), (y, b) in zip(rest, whole[4:]))
    with pytest.raises(UsageError, match="loader state is for epoch 1, not epoch 2"):
        next(again.epoch(2, state))


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
            assert (decode_identity(images) == labels.cpu().numpy()).all()
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
    with pytest.raises(UsageError, match="stage must be one of torch, dali, got 'pil'"):
        next(BatchAugmentLoader(train, batch_size=4, decoder="cpu").epoch(0, stage="pil"))


@pytest.mark.parametrize("stage", ["torch", "dali"])
def test_one_pipeline_per_stage_for_the_whole_run(demo_data, monkeypatch, stage):
    """Epochs, a pass left half-way (islice) and a resumed epoch all run through the one pipeline
    built at the start, and give exactly the batches of a loader that builds one per pass."""
    import itertools

    import dali_ba.loading.loader as loader_module

    built = []
    for name in ("batch_augment_pipeline", "decode_pipeline"):
        graph = getattr(loader_module, name)
        monkeypatch.setattr(loader_module, name, lambda *a, _graph=graph, **k: built.append(_graph) or _graph(*a, **k))
    args = dict(batch_size=4, views=2, view_size=24, num_threads=1, stage=stage, seed=3)
    kept = BatchAugmentLoader(demo_data / "train", **args)
    first = collect(kept.epoch(0))
    half = collect(itertools.islice(kept.epoch(1), 2))
    resumed = collect(kept.epoch(1, {"epoch": 1, "batches": 5}))
    last = collect(kept.epoch(2))
    assert len(built) == 1  # one graph for the whole run
    for epoch, batches, start in ((0, first, 0), (1, half, 0), (1, resumed, 5), (2, last, 0)):
        fresh = BatchAugmentLoader(demo_data / "train", **args)
        expected = collect(fresh.epoch(epoch, {"epoch": epoch, "batches": start}))[: len(batches)]
        assert len(batches) == len(expected) > 0
        for (x, y), (ex, ey) in zip(batches, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_torch_views_decode_on_the_cpu_whatever_the_decoder(demo_data, monkeypatch):
    """A visible GPU picks the mixed decoder; torch's view stage (CPU code) must then still be fed
    CPU-decoded images, and DALI's view graph the mixed decoder's (stand-in GPU, stand-in graphs)."""
    import dali_ba.loading.loader as loader_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = {}
    for name in ("decode_pipeline", "batch_augment_pipeline"):
        monkeypatch.setattr(loader_module, name, lambda _name=name, **kwargs: asked.update({_name: kwargs["decoder"]}))
    loader = BatchAugmentLoader(demo_data / "train", batch_size=4, views=2, view_size=24)
    assert (loader.decoder, loader.stage) == ("mixed", "dali")  # DALI's GPU operators make the views
    loader.build_pipeline(0, stage="torch")
    loader.build_pipeline(0, stage="dali")
    assert asked == {"decode_pipeline": "cpu", "batch_augment_pipeline": "mixed"}


def test_the_view_parameters_are_drawn_off_the_thread_that_dali_calls(demo_data):
    """DALI calls the source inside next(), on the training thread: each batch's view parameters (a
    Philox generator per sample) are drawn ahead on the reader's batch thread, once per batch, and the
    source times what is left on the calling thread."""
    import threading

    loader = BatchAugmentLoader(
        demo_data / "train", batch_size=4, views=2, view_size=24, num_threads=1, stage="dali", seed=3
    )
    drawn_on = []
    draw = loader._view_params

    def recorded(*args):
        drawn_on.append(threading.current_thread().name)
        return draw(*args)

    loader._view_params = recorded  # type: ignore[method-assign]
    batches = collect(loader.epoch(0))
    assert len(batches) == len(loader) == len(drawn_on)
    assert all(name.startswith("dali-ba-batches") for name in drawn_on), set(drawn_on)
    seconds, handed = loader.source_time()
    assert handed == len(loader) and seconds > 0
