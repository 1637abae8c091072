"""A segmentation model as a bioimage.io model package (spec 0.5), for Fiji/deepImageJ, ilastik and
QuPath: ``zfdiffusion export bioimageio``.

The package (one .zip) holds:

* **weights** twice: ``pytorch_state_dict`` (the float32 state dict, with the architecture as a
  plain-PyTorch source file, :data:`ARCHITECTURE_SOURCE`, and its keyword arguments) and
  ``torchscript`` (the same network scripted, its child). Both end in a sigmoid: the output is the
  probability the plugin computes, not logits, so a consumer that skips post-processing still gets it.
* **input** ``raw``: axes (batch, channel, y, x), one channel, float32; y and x of any size
  ``min + n * step`` where ``step`` is the network's down-sampling factor (2 ** (levels - 1)).
* **pre-processing**, the card's normalisation in bioimage.io's ops: ``scale_range`` with the card's
  percentiles per sample over (y, x), ``clip`` to [0, 1], ``scale_linear`` (x * 2 - 1: model space).
  bioimage.io's ``scale_range`` divides by ``hi - lo + 1e-6``; the plugin by ``hi - lo`` (a relative
  difference of 1e-6 / (hi - lo): nothing at the intensities of real images).
* **output** ``probability``: (batch, channel, y, x), the card's outputs as channels (foreground,
  and interior when trained), float32 in [0, 1], the size of the input, with a halo of half the
  card's tile overlap to crop when tiling.
* **test tensors** (.npy): a square crop of a real image (the bundled HeLa frame, or the user's) and
  the model's output on it; a **cover** (PNG, 2:1: the input and the probability beside it); the
  model card as **documentation** (MODEL_CARD.md, or one made from model.json, plus a section on
  the package); the card itself as an attachment; authors, citations and licence from the card.

What the package cannot say: instance labels (threshold, watershed of the foreground seeded by the
interiors, smallest object size) stay in the plugin (``zfdiffusion segment``); the documentation
says so, with the card's values.

``bioimageio.spec`` builds and checks the package; ``bioimageio.core`` (optional) runs the
consumers' own test on it (:func:`check_package`). Both: ``pip install napari-zfdiffusion[bioimageio]``.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from ..images import Normalisation, looks_rgb, to_gray
from ..io import atomic_write, check_writable, read_image
from ..provenance import PLUGIN_VERSION, now
from ..store import CARD_FILE, load_model, read_card, resolve_model
from .net import ResUNet
from .segmenter import KIND, OUTPUTS

INSTALL_HINT = "pip install napari-zfdiffusion[bioimageio]"
EPS = 1e-6  # bioimage.io's scale_range: (x - lo) / (hi - lo + eps)
TEST_SIDE = 256  # the test input: a square crop of at most this side (a 2:1 cover beside its output)
ARCH_FILE = "zfdiffusion_resunet.py"
HELA_SAMPLE = "hela_t16-19_crop.tif"  # a HeLa frame the demo model never saw (src/napari_zfdiffusion/_data)
# The Cell Tracking Challenge's paper: cited when a card's training data say they come from it.
CTC_CITE = ("Maška, M. et al. The Cell Tracking Challenge: 10 years of objective benchmarking. Nature Methods 20, "
            "1010-1020 (2023)")
CTC_DOI = "10.1038/s41592-023-01879-y"

# The network of net.py in plain PyTorch (no diffusers, no package imports), as bioimage.io's
# pytorch_state_dict format needs: the same modules under the same names (the state dict loads
# strictly) and the same operations, then a sigmoid. TorchScript-compatible. export_bioimageio()
# checks on the test input that it reproduces ResUNet's output, so a change to net.py that is not
# made here too fails the export instead of shipping a different network.
ARCHITECTURE_SOURCE = '''"""The segmentation U-Net of napari-zfdiffusion (core/segment/net.py: ResUNet) in plain
PyTorch, for the bioimage.io pytorch_state_dict weights. Input (B, in_channels, H, W) in model space [-1, 1];
output (B, out_channels, H, W): probabilities (probability=True) or logits. Sides that are not
multiples of 2 ** (len(channels) - 1) are padded by reflection and the output cropped back."""

from typing import List

import torch
from torch import nn
from torch.nn import functional as F


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.silu(h + self.skip(x))


class ResUNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: List[int] = (16, 32, 64, 128),
                 blocks: int = 1, probability: bool = True):
        super().__init__()
        ch = [int(c) for c in channels]
        self.multiple = 2 ** (len(ch) - 1)
        self.probability = bool(probability)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False), nn.BatchNorm2d(ch[0]),
                                  nn.SiLU())
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down.append(nn.Sequential(*[ResBlock(c, c) for _ in range(blocks)]))
            if i < len(ch) - 1:
                self.pool.append(nn.Sequential(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1, bias=False),
                                               nn.BatchNorm2d(ch[i + 1]), nn.SiLU()))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            self.up.append(nn.Conv2d(ch[i + 1], ch[i], 1, bias=False))
            self.merge.append(nn.Sequential(ResBlock(2 * ch[i], ch[i]),
                                            *[ResBlock(ch[i], ch[i]) for _ in range(blocks - 1)]))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        w = x.shape[-1]
        m = self.multiple
        ph = (m - h % m) % m
        pw = (m - w % m) % m
        if ph > 0 or pw > 0:
            if ph < h and pw < w:
                x = F.pad(x, [0, pw, 0, ph], mode="reflect")
            else:
                x = F.pad(x, [0, pw, 0, ph], mode="replicate")
        x = self.stem(x)
        skips: List[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            for j, pool in enumerate(self.pool):  # pool i follows block i (TorchScript: no ModuleList[i])
                if j == i:
                    skips.append(x)
                    x = pool(x)
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(F.interpolate(x, size=[skip.shape[-2], skip.shape[-1]], mode="nearest"))
            x = merge(torch.cat([x, skip], dim=1))
        x = self.head(x)[:, :, :h, :w]
        if self.probability:
            x = torch.sigmoid(x)
        return x
'''


@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote and measured."""

    path: Path
    name: str
    files: list[str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    step: int
    min_size: int
    halo: int
    #: largest |difference| on the test input, against the model's probability output (ResUNet +
    #: sigmoid on the same pre-processed input): the torchscript weights and the state-dict weights
    torchscript_max_abs: float
    state_dict_max_abs: float


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:4])


def require_spec():
    """``bioimageio.spec``, or a clear error saying how to install it (or that the installed one
    cannot work with the installed pydantic: before 0.5.14.3 it fails under pydantic 2.14)."""
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise UserInputError(f"exporting to bioimage.io needs the package bioimageio.spec: {INSTALL_HINT}") from None
    import pydantic

    if _version(spec.__version__) < (0, 5, 14, 3) and _version(pydantic.VERSION) >= (2, 14):
        raise UserInputError(f"bioimageio.spec {spec.__version__} cannot write bioimage.io packages with pydantic "
                             f"{pydantic.VERSION}: pip install 'bioimageio.spec>=0.5.14.3' (or 'pydantic<2.14').")
    return spec


def preprocess(raw: np.ndarray, norm: Normalisation) -> np.ndarray:
    """The package's pre-processing in NumPy, as bioimage.io runs it: ``scale_range`` (the card's
    percentiles of each sample over y and x, ``eps`` 1e-6), ``clip`` to [0, 1], then ``x * 2 - 1``.
    ``raw``: (B, C, Y, X)."""
    x = np.asarray(raw, np.float32)
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            lo, hi = np.percentile(x[b, c], [norm.low, norm.high])
            out[b, c] = np.clip((x[b, c] - lo) / (hi - lo + EPS), 0.0, 1.0)
    return out * 2.0 - 1.0


def _default_test_image() -> np.ndarray:
    from importlib import resources

    import tifffile

    with resources.as_file(resources.files("napari_zfdiffusion") / "_data" / HELA_SAMPLE) as p:
        return tifffile.imread(p)[0]


def make_test_input(image, step: int, min_size: int, name: str = "the test image") -> np.ndarray:
    """A 2D image (or the first plane of a stack) as the test input: a centred square crop of at most
    :data:`TEST_SIDE` pixels, its side a multiple of ``step``; (1, 1, S, S) float32 raw values."""
    arr = np.asarray(image)
    notes: list[str] = []
    if looks_rgb(arr):
        arr = to_gray(arr, name, notes)
    while arr.ndim > 2:
        arr = arr[0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise UserInputError(f"{name} must be a 2D grayscale image (or a stack of them), got {arr.dtype} {arr.shape}.")
    side = min(TEST_SIDE, *arr.shape) // step * step
    if side < min_size:
        raise UserInputError(f"{name} is {arr.shape[0]}x{arr.shape[1]} pixels: the test input needs "
                             f"{min_size}x{min_size} at least.")
    y0, x0 = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    crop = arr[y0:y0 + side, x0:x0 + side].astype(np.float32)
    if not np.isfinite(crop).all():
        raise UserInputError(f"{name} holds NaN or infinite values: give another test image.")
    return crop[None, None]


def _import_architecture(path: Path):
    spec = importlib.util.spec_from_file_location("zfdiffusion_resunet_export", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cover(raw: np.ndarray, prob: np.ndarray, norm: Normalisation) -> np.ndarray:
    """A 2:1 RGB cover: the normalised test input, and beside it the input with the foreground
    probability in green (and the interior, if any, in magenta)."""
    unit = (preprocess(raw, norm)[0, 0] + 1.0) / 2.0
    gray = np.repeat(unit[..., None], 3, axis=-1)
    fg = prob[0, 0]
    over = 0.45 * gray
    over[..., 1] += 0.55 * fg
    if prob.shape[1] > 1:
        over[..., 0] += 0.45 * prob[0, 1]
        over[..., 2] += 0.45 * prob[0, 1]
    img = np.concatenate([gray, np.clip(over, 0.0, 1.0)], axis=1)
    return (img * 255).round().astype(np.uint8)


def _documentation(path: Path, card: dict, outputs: list[str], step: int, min_size: int, halo: int,
                   tile: int, overlap: int) -> str:
    """The model card (MODEL_CARD.md, or a short one from model.json) and a section on the package."""
    doc = path / "MODEL_CARD.md"
    if doc.is_file():
        text = doc.read_text(encoding="utf-8").rstrip() + "\n"
    else:
        text = f"# {card.get('name', path.name)}\n\n{card.get('description', 'A segmentation U-Net.')}\n"
        data = card.get("training_data") or {}
        if data:
            licence = f" Licence: {data['licence']}." if data.get("licence") else ""
            text += f"\n## Training data\n\n{data.get('images', '?')} image(s). {data.get('credit', '')}{licence}\n"
    norm = Normalisation.from_dict(card.get("normalisation"))
    inner = outputs[1] if len(outputs) > 1 else None
    seed = card.get("seed_threshold")
    seed_text = (f"second output >= {seed:g}, the card's seed threshold" if seed is not None
                 else "second output >= the threshold")
    join = card.get("join_threshold")
    if join is not None and inner:
        seed_text += (f"; seeds are the connected regions of second output >= {join:g} (the card's join threshold) "
                      "that reach the seed threshold, so the cores of one large nucleus are one seed")
    labels = (f"objects by a watershed of the foreground seeded by the connected {inner}s ({seed_text}; touching "
              "objects stay apart)" if inner else "objects as its connected components")
    v = card.get("validation") or {}
    split = (card.get("training_data") or {}).get("validation") or "held out"
    figs = "The card records no validation figures."
    if "iou" in v and "dice" in v:
        figs = (f"At the last checkpoint of its training, on the held-out images ({split}): foreground IoU "
                f"{v['iou']:.3f}, Dice {v['dice']:.3f}" + (f", object F1 at IoU 0.5 {v['f1']:.3f}" if "f1" in v else "")
                + ".")
    text += f"""
## This bioimage.io package

Exported by napari-zfdiffusion {PLUGIN_VERSION} (`zfdiffusion export bioimageio`) on {now()[:10]}.

* **Input** `raw`: axes (batch, channel, y, x), one grayscale channel, float32 (any intensity
  range: cast the image to float32). y and x: any size `{min_size} + n * {step}` (the network
  down-samples by {step}); the plugin runs {tile} x {tile} tiles.
* **Pre-processing** (the plugin's normalisation): `scale_range` from percentile {norm.low:g} to
  percentile {norm.high:g} of each image over (y, x), `clip` to [0, 1], `scale_linear` (x * 2 - 1).
  The plugin takes the percentiles of the whole plane, before any tiling.
* **Output** `probability`: axes (batch, channel, y, x), channels {", ".join(outputs)}: float32
  probabilities in [0, 1] (the sigmoid is part of the network), the size of the input. When
  tiling, crop a halo of {halo} pixels on each side (the plugin's tiles overlap by {overlap}).
* **Weights**: `pytorch_state_dict` (architecture `{ARCH_FILE}`: the plugin's ResUNet in plain
  PyTorch) and `torchscript`, both float32, equal on the test input.

**Not in the package: instance labels.** The plugin turns these probabilities into labels:
foreground above {card.get('threshold', 0.5)}, {labels}, objects smaller than
{card.get('min_size', 16)} pixels dropped. bioimage.io has no operation for this watershed: Fiji,
ilastik and QuPath give the probability maps (threshold them there), and `zfdiffusion segment` or
the Segment dock in napari give the labels.

## Validation

{figs}

The test input (a square crop of a real image) and the model's output on it are in the package:
`bioimageio test PACKAGE.zip` (bioimageio.core) reruns both weight formats on it. The exporter
checked that both reproduce the plugin's network on it.
"""
    return text


def _authors(card: dict, Author) -> list:
    out = []
    for a in card.get("authors") or []:
        if isinstance(a, dict) and a.get("name"):
            out.append(Author(name=str(a["name"]).replace("/", "-"), affiliation=a.get("affiliation"),
                              github_user=a.get("github_user"), orcid=a.get("orcid")))
        elif isinstance(a, str) and a.strip():
            out.append(Author(name=a.strip().replace("/", "-")))
    return out or [Author(name="napari-zfdiffusion developers")]


def _project_urls() -> dict[str, str]:
    try:
        from importlib.metadata import metadata

        urls = metadata("napari-zfdiffusion").get_all("Project-URL") or []
    except Exception:  # noqa: BLE001 - not installed as a distribution: no links
        return {}
    return {k.strip(): v.strip() for k, v in (u.split(",", 1) for u in urls if "," in u)}


def _cite(card: dict, CiteEntry, urls: dict[str, str]) -> list:
    out = []
    for c in card.get("cite") or []:
        if isinstance(c, dict) and c.get("text") and (c.get("doi") or c.get("url")):
            out.append(CiteEntry(text=str(c["text"]), doi=c.get("doi"), url=c.get("url")))
    home = urls.get("Homepage") or urls.get("Source Code")
    if home:
        out.append(CiteEntry(text=f"napari-zfdiffusion {PLUGIN_VERSION}: the plugin that trained this model "
                                  "and turns its probabilities into instance labels", url=home))
    credit = str((card.get("training_data") or {}).get("credit", ""))
    if "Cell Tracking Challenge" in credit:
        out.append(CiteEntry(text=CTC_CITE + " (the training data)", doi=CTC_DOI))
    return out


def package_name(card: dict, path: Path, name: str | None = None) -> str:
    """A bioimage.io name (letters, digits, ``_+- ()``, 5 to 128 characters) from ``name`` or the card."""
    raw = name or f"{card.get('name') or path.name} (napari-zfdiffusion)"
    clean = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", raw).strip()[:128]
    if len(clean) < 5:
        clean = (clean + " segmentation U-Net")[:128]
    return clean


def export_bioimageio(model: str | Path, out: str | Path, *, test_image: str | Path | np.ndarray | None = None,
                      name: str | None = None, tags: list[str] | None = None) -> ExportResult:
    """Write a segmentation model (a folder, or a bundled/user model's name) as a bioimage.io model
    package ``out`` (.zip). ``test_image``: a TIFF/PNG path or an array to make the test tensors from
    (default: a HeLa frame shipped with the plugin); ``name``: the package's name (default: the
    card's, with "(napari-zfdiffusion)"); ``tags``: added to the default tags.

    Raises UserInputError for a model that is not a segmentation model, an output that is not a
    .zip, a missing bioimageio.spec, or a test image that does not fit."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise UserInputError(f"the bioimage.io package is a .zip file: give --out a name ending in .zip, "
                             f"e.g. {out.with_suffix('.zip').name}, not '{out.name}'.")
    path = resolve_model(model)
    card = read_card(path, (KIND,))
    require_spec()
    check_writable(out)
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    net = load_model(path / "unet", ResUNet, "segmentation model folder").to("cpu").eval().requires_grad_(False)
    cfg = net.config
    step = net.multiple
    overlap = int(card.get("overlap", 32) or 0)
    halo = max(0, overlap // 2)
    min_size = max(32, -(-max(4 * halo, 2 * step) // step) * step)  # 64 for the demo: 4 halos, a multiple of step
    tile = int(card.get("tile", 256) or 256)
    outputs = [str(o) for o in card.get("outputs", OUTPUTS[: cfg.out_channels])][: cfg.out_channels]
    outputs += [f"channel{i}" for i in range(len(outputs), cfg.out_channels)]
    norm = Normalisation.from_dict(card.get("normalisation"))
    if isinstance(test_image, (str, Path)):
        test_image = read_image(test_image)
        source = "the given test image"
    else:
        source = ("the given test image" if test_image is not None
                  else "Fluo-N2DL-HeLa frame 16 (shipped with the plugin; held out from the demo models)")
    raw = make_test_input(_default_test_image() if test_image is None else test_image, step, min_size)
    with torch.no_grad():
        prob = torch.sigmoid(net(torch.from_numpy(preprocess(raw, norm)))).numpy().astype(np.float32)

    kwargs = {"in_channels": int(cfg.in_channels), "out_channels": int(cfg.out_channels),
              "channels": [int(c) for c in cfg.channels], "blocks": int(cfg.blocks), "probability": True}
    with tempfile.TemporaryDirectory(prefix="zfdiffusion-bioimageio-") as tmp:
        d = Path(tmp)
        arch = d / ARCH_FILE
        arch.write_text(ARCHITECTURE_SOURCE, encoding="utf-8")
        plain = _import_architecture(arch).ResUNet(**kwargs).eval()
        state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        plain.load_state_dict(state, strict=True)
        torch.save(state, d / "weights.pt")
        scripted = torch.jit.script(plain)
        scripted.save(str(d / "weights_torchscript.pt"))
        x = torch.from_numpy(preprocess(raw, norm))
        with torch.no_grad():
            sd_diff = float(np.abs(plain(x).numpy() - prob).max())
            ts_diff = float(np.abs(torch.jit.load(str(d / "weights_torchscript.pt"))(x).numpy() - prob).max())
        if max(sd_diff, ts_diff) > 1e-4:  # the copy in ARCHITECTURE_SOURCE has drifted from net.py
            raise RuntimeError(f"the exported network does not reproduce the model (max |diff| state dict "
                               f"{sd_diff:.2e}, torchscript {ts_diff:.2e}): ARCHITECTURE_SOURCE in {__name__} "
                               "must follow core/segment/net.py")
        np.save(d / "test_input.npy", raw)
        np.save(d / "test_output.npy", prob)
        import tifffile

        tifffile.imwrite(d / "sample_input.tif", raw[0, 0])  # sample tensors: what a person looks at
        tifffile.imwrite(d / "sample_output.tif", prob[0])
        from PIL import Image

        Image.fromarray(_cover(raw, prob, norm)).save(d / "cover.png")
        doc = _documentation(path, card, outputs, step, min_size, halo, tile, overlap)
        (d / "README.md").write_text(doc, encoding="utf-8")
        (d / "zfdiffusion_model.json").write_bytes((path / CARD_FILE).read_bytes())

        urls = _project_urls()
        version = re.match(r"\d+(\.\d+)*", torch.__version__).group(0)
        space = [bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=min_size, step=step))
                 for a in ("y", "x")]

        def out_axis(a: str):
            ref = bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId(a))
            if halo >= 1:
                return bio.SpaceOutputAxisWithHalo(id=bio.AxisId(a), size=ref, halo=halo)
            return bio.SpaceOutputAxis(id=bio.AxisId(a), size=ref)

        inp = bio.InputTensorDescr(
            id=bio.TensorId("raw"),
            description="one grayscale plane, any intensity range (percentile-normalised by the pre-processing)",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("raw")]), *space],
            test_tensor=bio.FileDescr(source=d / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=d / "sample_input.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[
                bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId("y"), bio.AxisId("x")], min_percentile=norm.low, max_percentile=norm.high,
                    eps=EPS)),
                bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)),
                bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=2.0, offset=-1.0)),
            ])
        outp = bio.OutputTensorDescr(
            id=bio.TensorId("probability"),
            description=f"probabilities ({', '.join(outputs)}); labels (threshold, watershed) stay in the plugin",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(o) for o in outputs]),
                  out_axis("y"), out_axis("x")],
            test_tensor=bio.FileDescr(source=d / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=d / "sample_output.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
        arch_descr = bio.ArchitectureFromFileDescr(source=arch, callable=bio.Identifier("ResUNet"), kwargs=kwargs)
        weights = bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=d / "weights.pt", architecture=arch_descr, pytorch_version=bio.Version(version),
                comment="float32 state dict of the plugin's ResUNet (stored weights loaded as float32)"),
            torchscript=bio.TorchscriptWeightsDescr(
                source=d / "weights_torchscript.pt", pytorch_version=bio.Version(version),
                parent="pytorch_state_dict", comment="torch.jit.script of the architecture with these weights"))
        data = card.get("training_data") or {}
        try:
            descr = bio.ModelDescr(
                name=package_name(card, path, name),
                description=(f"{card.get('description') or 'U-Net segmentation'} (napari-zfdiffusion). "
                             "Outputs probabilities; instance labels (threshold, watershed) are made by the plugin, "
                             "see the documentation.")[:512],
                authors=_authors(card, bio.Author),
                cite=_cite(card, bio.CiteEntry, urls),
                license=str(card.get("licence") or "BSD-3-Clause"),
                documentation=bio.FileDescr(source=d / "README.md"),
                covers=[bio.FileDescr(source=d / "cover.png")],
                attachments=[bio.FileDescr(source=d / "zfdiffusion_model.json")],
                git_repo=urls.get("Source Code"),
                tags=sorted(set(["unet", "pytorch", "2d", "semantic-segmentation", "napari-zfdiffusion"]
                                + [str(t) for t in card.get("tags") or []] + list(tags or []))),
                inputs=[inp], outputs=[outp], weights=weights,
                config=bio.Config(
                    bioimageio=bio.BioimageioConfig(
                        architecture_type="2D residual U-Net",
                        architecture_description=(f"residual U-Net, widths {kwargs['channels']}, {kwargs['blocks']} "
                                                  "residual block(s) per level, batch norm, sigmoid output"),
                        task="semantic-segmentation",
                        model_parameter_count=int(sum(p.numel() for p in net.parameters())),
                    ),
                    zfdiffusion={"card": card.get("name", path.name), "plugin_version": PLUGIN_VERSION,
                                 "threshold": card.get("threshold", 0.5), "min_size": card.get("min_size", 16),
                                 "seed_threshold": card.get("seed_threshold", card.get("threshold", 0.5)),
                                 "join_threshold": card.get("join_threshold"),
                                 "tile": tile, "overlap": overlap, "outputs": outputs,
                                 "labels_from": f"watershed from {outputs[1]}s" if len(outputs) > 1
                                 else "connected components",
                                 "normalisation": norm.to_dict(), "test_input": source,
                                 "training_data": data.get("credit")}),
            )
            atomic_write(out, lambda t: _save_zip(save_bioimageio_package, descr, t))
        except ValueError as e:  # pydantic's ValidationError too: a field bioimage.io refuses, e.g. a --tag
            if isinstance(e, UserInputError):
                raise
            raise UserInputError(f"bioimageio.spec refused the package: {str(e)[:800]}") from None
        import zipfile

        with zipfile.ZipFile(out) as z:
            files = sorted(z.namelist())
    return ExportResult(path=out, name=descr.name, files=files, input_shape=tuple(raw.shape),
                        output_shape=tuple(prob.shape), step=step, min_size=min_size, halo=halo,
                        torchscript_max_abs=ts_diff, state_dict_max_abs=sd_diff)


def _save_zip(save, descr, tmp: Path) -> None:
    """bioimageio.spec's writer wants a .zip name: write beside ``tmp`` under one, then move it there."""
    target = tmp.with_name(tmp.name + ".zip")
    try:
        save(descr, output_path=target)
        target.replace(tmp)
    finally:
        target.unlink(missing_ok=True)


def check_package(path: str | Path, *, weight_format: str | None = None, devices: list[str] | None = None):
    """bioimageio.core's own model test (what the consumers run) on a package: a ValidationSummary
    (``.status`` is "passed" or "failed"; ``.details`` has one entry per check). Needs
    bioimageio.core (UserInputError otherwise)."""
    try:
        from bioimageio.core import test_model
    except ImportError:
        raise UserInputError(f"testing a bioimage.io package needs the package bioimageio.core: {INSTALL_HINT}") \
            from None
    return test_model(str(path), weight_format=weight_format, devices=devices or ["cpu"])


__all__ = ["ARCHITECTURE_SOURCE", "ExportResult", "check_package", "export_bioimageio", "make_test_input",
           "package_name", "preprocess", "require_spec"]
