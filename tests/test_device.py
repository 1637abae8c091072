"""Devices (``--device cuda:N``), the optional ``torch.compile`` (ZFDIFFUSION_COMPILE=1) and batch sizes
from a GPU's free memory (``--batch auto``). On a machine without CUDA everything but the last test
runs (torch.cuda.mem_get_info and torch.compile are stood in for); with CUDA the smoke test runs too
(benchmarks/gpu_check.sh runs this file on a GPU)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from napari_zfdiffusion.core import device as dv
from napari_zfdiffusion.core.errors import UserInputError

HAS_CUDA = torch.cuda.is_available()
GIB = 1 << 30
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_zfdiffusion" / "_data" / "hela_t16-19_crop.tif"


def device_options() -> dict[str, argparse.Action]:
    """Every ``--device`` option of the ``zfdiffusion`` parser, by the command that has it."""
    from napari_zfdiffusion.cli import build_parser

    found = {}

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())
            elif "--device" in action.option_strings:
                found[name] = (parser, action)

    walk(build_parser(), "")
    return found


# ----------------------------------------------------------------------------- parsing
def test_every_device_option_takes_cuda_n_and_says_its_forms_in_help():
    options = device_options()
    assert {"generate", "segment", "em generate", "train cascade", "train unet", "train vae"} <= set(options)
    for name, (parser, action) in options.items():
        for given, want in (("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("mps", "mps"), ("cuda:0", "cuda:0"),
                            ("cuda:3", "cuda:3"), ("CUDA:1", "cuda:1"), ("cuda:01", "cuda:1")):
            assert action.type(given) == want, name
        assert action.default == "auto"
        assert "{auto,cpu,cuda,cuda:N,mps}" in parser.format_help(), name


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "cuda:-1", "cuda1", "cuda:0:1", "tpu", ""])
def test_bad_device_forms_are_refused_naming_the_choices(bad, capsys):
    from napari_zfdiffusion import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["segment", "--in", "x.tif", "--out", "y.tif", "--device", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and f"unknown device '{bad}'" in err
    assert "auto, cpu, cuda, cuda:N, mps" in err


def test_the_parser_takes_cuda_n_for_every_command_that_has_a_device():
    from napari_zfdiffusion.cli import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "--depth", "0", "--out", "o.tif", "--device", "cuda:1"]).device == "cuda:1"
    assert p.parse_args(["segment", "--in", "i.tif", "--out", "o.tif", "--device", "cuda:2"]).device == "cuda:2"
    a = p.parse_args(["train", "cascade", "--data", "d", "--out", "m", "--device", "cuda:0"])
    assert a.device == "cuda:0"


@pytest.mark.parametrize(("args", "default"), [(["segment", "--in", "i.tif", "--out", "o.tif"], "auto"),
                                               (["em", "generate", "--out", "o.tif"], "auto")])
def test_batch_is_auto_or_a_positive_whole_number(args, default, capsys):
    from napari_zfdiffusion.cli import build_parser

    p = build_parser()
    assert p.parse_args(args).batch == default
    assert p.parse_args([*args, "--batch", "AUTO"]).batch == "auto"
    assert p.parse_args([*args, "--batch", "12"]).batch == 12
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(SystemExit):
            p.parse_args([*args, "--batch", bad])
        assert "expected 'auto' or a whole number of at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resolve_device
def test_resolve_device_on_this_machine(monkeypatch):
    assert dv.resolve_device("cpu") == torch.device("cpu")
    assert dv.resolve_device("CPU") == torch.device("cpu")
    assert dv.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserInputError, match=r"unknown device 'gpu'.*cuda:N"):
        dv.resolve_device("gpu")
    with pytest.raises(UserInputError, match="unknown device 'cuda:x'"):
        dv.resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3"):  # a CPU-only torch: the clear message, whatever the GPU asked for
        with pytest.raises(UserInputError, match="sees no CUDA GPU.*--device cpu"):
            dv.resolve_device(name)


@pytest.mark.parametrize(("count", "says"), [(1, "has 1 CUDA GPU (cuda:0;"), (2, "has 2 CUDA GPUs (cuda:0 to cuda:1;")])
def test_a_gpu_number_beyond_those_there_names_how_many_there_are(monkeypatch, count, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UserInputError) as e:
        dv.resolve_device("cuda:3")
    assert "'cuda:3'" in str(e.value) and says in str(e.value)
    assert dv.resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)


def test_available_devices_lists_each_gpu_when_there_are_several(monkeypatch):
    monkeypatch.setattr(dv, "_mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dv.available_devices() == ["auto", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dv.available_devices() == ["auto", "cpu", "cuda"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dv.available_devices() == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]


# ----------------------------------------------------------------------------- maybe_compile
def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 1))


def counting_compile(monkeypatch, fail: BaseException | None = None) -> list:
    """torch.compile stood in for: records its calls; the 'compiled' function runs the eager one, or raises."""
    calls = []

    def fake_compile(fn, *a, **k):
        calls.append(fn)

        def compiled(*args, **kwargs):
            calls.append("run")
            if fail is not None:
                raise fail
            return fn(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


@pytest.mark.parametrize("env", [None, "0", "1"])
@pytest.mark.parametrize("where", ["cpu", "mps"])
def test_maybe_compile_does_nothing_off_cuda(monkeypatch, env, where):
    calls = counting_compile(monkeypatch)
    if env is None:
        monkeypatch.delenv(dv.COMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(dv.COMPILE_ENV, env)
    net = small_net()
    assert dv.maybe_compile(net, torch.device(where)) is net
    assert "forward" not in net.__dict__ and calls == []


def test_maybe_compile_needs_the_variable(monkeypatch):
    calls = counting_compile(monkeypatch)
    monkeypatch.delenv(dv.COMPILE_ENV, raising=False)
    net = small_net()
    assert dv.maybe_compile(net, "cuda") is net and calls == [] and "forward" not in net.__dict__


def test_maybe_compile_on_cuda_compiles_in_place_once(monkeypatch):
    """(torch.compile stood in for: the CUDA path's wiring, on a CPU.) The class, the attributes and the
    state_dict keys stay; compiling twice does not wrap twice."""
    calls = counting_compile(monkeypatch)
    monkeypatch.setenv(dv.COMPILE_ENV, "1")
    net = small_net()
    keys = list(net.state_dict())
    x = torch.randn(2, 1, 16, 16)
    want = net(x)
    assert dv.maybe_compile(net, torch.device("cuda")) is net
    assert dv.maybe_compile(net, "cuda:0") is net
    assert isinstance(net, torch.nn.Sequential) and list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), want)
    assert len([c for c in calls if c != "run"]) == 1 and calls.count("run") == 1


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, recwarn):
    calls = counting_compile(monkeypatch, fail=RuntimeError("inductor could not build a kernel\nmore detail"))
    monkeypatch.setenv(dv.COMPILE_ENV, "1")
    net = small_net()
    x = torch.randn(1, 1, 8, 8)
    want = net(x)
    dv.maybe_compile(net, "cuda")
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed for Sequential \(RuntimeError: inductor could not "
                                            r"build a kernel\); running it without compiling"):
        torch.testing.assert_close(net(x), want)
    torch.testing.assert_close(net(x), want)  # eager from then on: no second try, no second warning
    assert calls.count("run") == 1
    assert not [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]


def test_a_gpu_out_of_memory_is_not_taken_for_a_compile_failure(monkeypatch):
    counting_compile(monkeypatch, fail=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    monkeypatch.setenv(dv.COMPILE_ENV, "1")
    net = dv.maybe_compile(small_net(), "cuda")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        net(torch.randn(1, 1, 8, 8))


def test_torch_compile_refusing_at_once_leaves_the_module_eager(monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("Python 3.14 is not supported by Dynamo")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setenv(dv.COMPILE_ENV, "1")
    net = small_net()
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        assert dv.maybe_compile(net, "cuda") is net
    assert "forward" not in net.__dict__


def test_the_loaders_offer_their_inference_networks_to_maybe_compile(monkeypatch):
    """Cascade stages, the latent UNet and the autoencoder's decoder, the segmentation U-Net: each loader
    hands its network to maybe_compile with the device it runs on (which compiles only on CUDA)."""
    from napari_zfdiffusion.core.cascade import Cascade
    from napari_zfdiffusion.core.cascade import model as cascade_model
    from napari_zfdiffusion.core.latent import LatentModel
    from napari_zfdiffusion.core.latent import autoencoder, model as latent_model
    from napari_zfdiffusion.core.segment import Segmenter, segmenter

    seen = []

    def record(module, device):
        seen.append((type(module).__name__, torch.device(device).type))
        return module

    for mod in (cascade_model, autoencoder, latent_model, segmenter):
        monkeypatch.setattr(mod, "maybe_compile", record)
    Segmenter.load("nuclei-unet-demo", "cpu")
    LatentModel.load("em-ldm-demo", "cpu")
    cas = Cascade.load("zf-cascade-demo", "cpu")
    cas._model(cas.stages["base"])
    assert seen == [("ResUNet", "cpu"), ("Decoder", "cpu"), ("ZfUNet", "cpu"), ("ZfUNet", "cpu")]


# ----------------------------------------------------------------------------- auto_batch
def fake_free(monkeypatch, free: int, total: int = 80 * GIB) -> list:
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_auto_batch_off_cuda_is_the_default(monkeypatch):
    asked = fake_free(monkeypatch, 80 * GIB)
    assert dv.auto_batch("cpu", 10 << 20, default=4, cap=32) == 4
    assert dv.auto_batch(torch.device("cpu"), 1, default=8, cap=64) == 8
    assert dv.auto_batch("mps", 1, default=8, cap=64) == 8
    assert asked == []  # never asks CUDA


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_auto_batch_on_cuda_without_cuda_is_the_default():
    assert dv.auto_batch("cuda", 10 << 20, default=4, cap=32) == 4


@pytest.mark.parametrize("free_gib", [1, 1.5, 2, 3, 5, 12, 80])
def test_auto_batch_fits_half_the_free_memory_and_respects_the_cap(monkeypatch, free_gib):
    free = int(free_gib * GIB)
    asked = fake_free(monkeypatch, free)
    per = 100 << 20  # 100 MiB an item
    n = dv.auto_batch(torch.device("cuda", 1), per, default=4, cap=32)
    assert asked == [torch.device("cuda", 1)]  # the GPU asked for, not the current one
    assert 1 <= n <= 32
    if n > 1:  # what it chose fits in half the free memory, less the reserve
        assert n * per <= free / 2 - GIB
    if n < 32:  # and one more would not
        assert (n + 1) * per > free / 2 - GIB or n == 1
    assert n == max(1, min(32, int((free / 2 - GIB) // per)))


def test_auto_batch_examples(monkeypatch):
    fake_free(monkeypatch, 10 * GIB)
    assert dv.auto_batch("cuda", 100 << 20, default=4, cap=32) == 32  # (5 - 1) GiB / 100 MiB = 40 -> cap
    assert dv.auto_batch("cuda", 100 << 20, default=4, cap=64) == 40
    assert dv.auto_batch("cuda", 8 * GIB, default=4, cap=32) == 1  # never 0
    assert dv.auto_batch("cuda", 100 << 20, default=4, cap=32, fraction=0.25, reserve=0) == 25


def test_pyramid_bytes_is_eight_float32_feature_maps_per_level():
    assert dv.pyramid_bytes([16], 256) == 8 * 4 * 16 * 256 * 256
    assert dv.pyramid_bytes([16, 32], 100) == 8 * 4 * (16 * 100 * 100 + 32 * 50 * 50)
    assert dv.pyramid_bytes([8, 8, 8], 5) == 8 * 4 * 8 * (25 + 9 + 4)  # sides round up: 5, 3, 2


def test_segment_and_em_generate_resolve_auto_batches(monkeypatch):
    """--batch auto: on a CPU the numbers of old (4 tiles, 8 patches); on a GPU from its free memory, with
    the per-item estimates in the commands' docstrings."""
    from napari_zfdiffusion.cli.latent import _em_batch
    from napari_zfdiffusion.cli.segment import _batch

    seg = SimpleNamespace(device=torch.device("cpu"), net=SimpleNamespace(config=SimpleNamespace(
        channels=[16, 32, 64, 128])))
    latent = SimpleNamespace(device=torch.device("cpu"), unet=SimpleNamespace(config=SimpleNamespace(
        block_out_channels=[32, 64, 128, 128])), vae=SimpleNamespace(config=SimpleNamespace(
            block_out_channels=[16, 32, 64, 64])), card={"latent_shape": [4, 32, 32]}, patch_size=256)
    assert _batch(SimpleNamespace(batch="auto", tile=256), seg) == 4
    assert _batch(SimpleNamespace(batch=6, tile=256), seg) == 6
    assert _em_batch(SimpleNamespace(batch="auto", n=100), latent) == 8
    assert _em_batch(SimpleNamespace(batch=3, n=100), latent) == 3

    seg.device = latent.device = torch.device("cuda")
    fake_free(monkeypatch, 4 * GIB)  # (2 - 1) GiB usable
    tile = dv.pyramid_bytes([16, 32, 64, 128], 256)
    assert 60e6 < tile < 66e6  # "about 63 MB"
    assert _batch(SimpleNamespace(batch="auto", tile=256), seg) == GIB // tile == 17
    assert _batch(SimpleNamespace(batch="auto", tile=512), seg) == 4  # four times the pixels
    patch = dv.pyramid_bytes([32, 64, 64, 64], 256)  # the decoder's widths one level up
    assert 108e6 < patch < 114e6  # "about 111 MB"
    assert _em_batch(SimpleNamespace(batch="auto", n=100), latent) == GIB // patch == 9
    assert _em_batch(SimpleNamespace(batch="auto", n=3), latent) == 3  # never more than --n
    fake_free(monkeypatch, 80 * GIB)
    assert _batch(SimpleNamespace(batch="auto", tile=256), seg) == 32
    assert _em_batch(SimpleNamespace(batch="auto", n=1000), latent) == 64


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")
def test_cuda_smoke(tmp_path, monkeypatch):
    from napari_zfdiffusion import cli

    count = torch.cuda.device_count()
    assert dv.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserInputError, match=f"has {count} CUDA GPU"):
        dv.resolve_device(f"cuda:{count}")
    assert dv.autocast_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    n = dv.auto_batch("cuda:0", 64 << 20, default=4, cap=32)
    assert 1 <= n <= 32

    # torch.compile for real (or its fallback, with the warning): the same numbers as eager
    monkeypatch.setenv(dv.COMPILE_ENV, "1")
    net = small_net().cuda().eval()
    x = torch.randn(4, 1, 64, 64, device="cuda")
    with torch.no_grad():
        want = net(x)
        dv.maybe_compile(net, "cuda")
        torch.testing.assert_close(net(x), want, rtol=1e-3, atol=1e-3)
    monkeypatch.delenv(dv.COMPILE_ENV)

    # the segment command with --batch auto on cuda:0, against the CPU
    out_gpu, out_cpu = tmp_path / "gpu.tif", tmp_path / "cpu.tif"
    for dev, out in (("cuda:0", out_gpu), ("cpu", out_cpu)):
        assert cli.main(["-q", "segment", "--in", str(SAMPLE), "--out", str(out), "--device", dev]) == 0
    import tifffile

    gpu, cpu = tifffile.imread(out_gpu), tifffile.imread(out_cpu)
    assert gpu.shape == cpu.shape and gpu.max() > 0
    assert ((gpu > 0) == (cpu > 0)).mean() > 0.99  # fp16 autocast vs float32: the same foreground
