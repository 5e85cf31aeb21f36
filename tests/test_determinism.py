"""What the GPU path is asked to do, checked on the CPU: --deterministic's switches (torch's, cuDNN's,
cuBLAS's), DALI's dynamic executor on every graph, no GPU-to-CPU edge in the view graph, and the mixed
decoder's hardware share (--hw-decoder-load) from the loaders down to the decoder."""

import os

import pytest
import torch

from dali_ba.loading import pipeline
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD
from dali_ba.training.determinism import CUBLAS_WORKSPACE, apply_determinism

CUBLAS_AT_START = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
DETERMINISTIC_AT_START = torch.are_deterministic_algorithms_enabled()


@pytest.fixture
def torch_switches(monkeypatch):
    """torch's global switches as they were, put back after the test (and CUBLAS_WORKSPACE_CONFIG unset)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # noted as it was (perhaps unset), restored after
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    kept = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = kept[:2]
    torch.use_deterministic_algorithms(kept[2], warn_only=kept[3])


def switches() -> tuple[bool, bool, bool]:
    return (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # only flags: setting them needs no GPU
def test_deterministic_turns_benchmark_off_and_deterministic_kernels_on(torch_switches, device):
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    applied = apply_determinism(True, torch.device(device))
    assert switches() == (False, True, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert applied == {
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
        "deterministic_algorithms": True,
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    assert torch.empty(8).isnan().all()  # torch's deterministic mode, seen on the CPU: no uninitialised memory


def test_a_cublas_workspace_already_set_is_kept(torch_switches, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert apply_determinism(True, "cuda")["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_otherwise_benchmark_on_a_gpu_and_nothing_forced(torch_switches):
    torch.use_deterministic_algorithms(True)  # a run before in this process asked for them
    assert apply_determinism(False, "cuda") == {
        "cudnn_benchmark": True,
        "cudnn_deterministic": False,
        "deterministic_algorithms": False,
    }
    assert switches() == (True, False, False)
    apply_determinism(False, "cpu")
    assert switches() == (False, False, False) and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


# --- DALI: the executor and the decoder's split -----------------------------------------------------------


def no_samples(info):  # a stand-in source: the graphs are defined, never run
    raise AssertionError("not run")


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (pipeline.decode_pipeline, {}),
        (pipeline.center_crop_pipeline, dict(resize=36, crop=32)),
        (pipeline.batch_augment_pipeline, dict(views=2, view_size=24, decoder="cpu")),
        (pipeline.batch_augment_pipeline, dict(views=2, view_size=24, decoder="cpu", augment="trivial", auto_ops=1)),
    ],
)
def test_every_graph_asks_for_the_dynamic_executor(make, kwargs):
    """DALI picks it by default only for an asynchronous, pipelined executor: it stays asked for where a
    caller turns those off, as a benchmark does."""
    plain = make(
        samples=no_samples,
        batch_size=2,
        num_threads=1,
        device_id=None,
        exec_async=False,
        exec_pipelined=False,
        **kwargs,
    )
    assert plain.exec_dynamic is True


RUN = dict(batch_size=2, num_threads=1, device_id=None)  # no GPU: the graphs are defined and serialized only


@pytest.mark.parametrize(
    "kwargs", [{}, dict(augment="cifar"), dict(augment="trivial", auto_ops=1), dict(augment="randaugment", auto_ops=2)]
)
def test_the_gpu_paths_view_graph_has_no_gpu_to_cpu_edge(kwargs):
    """A CPU operator on a GPU output (as ``images.shape()`` of the mixed decoder's once gave the crop
    bounds) makes the dynamic executor wait on the host for the GPU every batch. DALI's older
    execution model refuses every such edge when the graph is defined or serialized, which needs no
    GPU: the mixed decoder's view graph passes, for each augmentation."""
    views = pipeline.batch_augment_pipeline(
        samples=no_samples, views=2, view_size=24, decoder="mixed", exec_dynamic=False, **RUN, **kwargs
    )
    views.serialize()


@pytest.mark.parametrize("edge", ["shape", "cpu operator"])
def test_dali_refuses_a_gpu_to_cpu_edge_without_the_dynamic_executor(edge):
    """What makes the test above mean something: the same check refuses the shape of a GPU decode,
    and a CPU operator on it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(exec_dynamic=False)
    def graph(samples):
        encoded, _ = pipeline.read_samples(samples)
        images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
        return images.shape() if edge == "shape" else fn.cast(images, dtype=types.FLOAT, device="cpu")

    with pytest.raises(RuntimeError, match="transition from GPU to CPU|incompatible device"):
        graph(samples=no_samples, **RUN).serialize()


@pytest.fixture
def decoder_calls(monkeypatch):
    """The keywords of every DALI decoder the graphs define, whole-image or ROI (decoding on the CPU
    whatever was asked: the graphs are only defined here)."""
    from nvidia.dali import fn

    calls = []

    def spy(real):
        def decoder(encoded, *inputs, **kwargs):
            calls.append(kwargs)
            on_cpu = {k: v for k, v in kwargs.items() if k not in ("device", "hw_decoder_load")}
            return real(encoded, *inputs, **on_cpu, device="cpu")

        return decoder

    monkeypatch.setattr(fn.decoders, "image", spy(fn.decoders.image))
    monkeypatch.setattr(fn.decoders, "image_slice", spy(fn.decoders.image_slice))
    return calls


def test_the_mixed_decoder_gets_the_share_and_the_cpu_decoder_none(decoder_calls):
    args = dict(samples=no_samples, batch_size=2, num_threads=1, device_id=None)
    pipeline.center_crop_pipeline(resize=36, crop=32, decoder="mixed", hw_decoder_load=0.3, **args)
    pipeline.batch_augment_pipeline(views=2, view_size=24, decoder="mixed", **args)
    pipeline.center_crop_pipeline(resize=36, crop=32, decoder="cpu", hw_decoder_load=0.3, **args)
    pipeline.decode_pipeline(decoder="cpu", **args)
    pipeline.decode_pipeline(decoder="cpu", params=pipeline.param_outputs("imagenet", 0), **args)
    assert [(c["device"], c.get("hw_decoder_load")) for c in decoder_calls] == [
        ("mixed", 0.3),
        ("mixed", DEFAULT_HW_DECODER_LOAD),  # the views' ROI decoder
        ("cpu", None),
        ("cpu", None),
        ("cpu", None),  # torch's view stage's ROI decoder
    ]


class Asked(Exception):
    """Raised by a stand-in graph once it has noted what it was asked for."""


def test_the_loaders_pass_the_share_to_their_graphs(demo_data, monkeypatch):
    import dali_ba.loading.loader as loader_module
    from dali_ba.errors import UsageError
    from dali_ba.loading.loader import AugmentedValidationLoader, BatchAugmentLoader, ValidationLoader

    asked = {}

    def stand_in(name):
        def graph(**kwargs):
            asked[name] = kwargs["hw_decoder_load"]
            raise Asked

        return graph

    for name in ("batch_augment_pipeline", "center_crop_pipeline"):
        monkeypatch.setattr(loader_module, name, stand_in(name))
    cpu = dict(batch_size=4, decoder="cpu")
    with pytest.raises(Asked):
        BatchAugmentLoader(demo_data / "train", views=2, view_size=24, hw_decoder_load=0.25, **cpu).build_pipeline(
            0, stage="dali"
        )
    assert asked == {"batch_augment_pipeline": 0.25}
    with pytest.raises(Asked):
        next(iter(AugmentedValidationLoader(demo_data / "val", views=2, view_size=24, stage="dali", **cpu)))
    assert asked == {"batch_augment_pipeline": DEFAULT_HW_DECODER_LOAD}
    with pytest.raises(Asked):
        next(iter(ValidationLoader(demo_data / "val", resize=36, crop=32, hw_decoder_load=0.5, **cpu)))
    assert asked["center_crop_pipeline"] == 0.5
    with pytest.raises(UsageError, match="hw_decoder_load must be between 0 and 1, got 2"):
        ValidationLoader(demo_data / "val", hw_decoder_load=2, **cpu)


def test_the_switches_and_the_environment_were_put_back():
    """Runs after the tests above (file order): nothing they set leaks into the rest of the session."""
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_AT_START
    assert torch.are_deterministic_algorithms_enabled() == DETERMINISTIC_AT_START
