"""Shared machinery of FPT and FPT+: options, input views, the model (frozen LPM + fusion + side network),
feature preloading and the introspection hooks for the papers' attention figures.

`methods/fpt_plus.py` and `methods/fpt.py` only choose defaults and the fusion module class.

Decisions the papers and the spec leave open (documented here once):

* Side resolution (`side_res` unset): the variant's paper size (128 px FPT+, 224 px FPT) when the LPM
  resolution is at least that size, so the LPM-resolution sweep keeps the side at 128 px as the spec
  asks; below it (tiny smoke/test runs) the paper's ratio to 512 px is applied
  (res × base / 512). Either way the size is snapped to the nearest multiple of the patch size, at
  least one patch. `views()` runs before the backbone is known and assumes patch 16 (every backbone of
  the papers); `build()` uses the real patch and refuses a mismatch.
* `asymmetric=false` (paper §3.3/§3.6, Fig. 7): the side network and the LPM read *the same* image at
  the LPM resolution, augmented in training. The LPM input is then random, so its features cannot be
  preloaded: with asymmetric=false the LPM always runs online (logged; `preload_info` says why).
* `fusion=mlp` (paper §3.4's "simple approach", Fig. 7 row 2): the output hidden states of each fed LPM
  block go through a shared LayerNorm(D) + MLP (D→D_s, GELU, D_s→D_s) + dropout and are appended to the
  side sequence for that block, all N tokens (or, with token selection, the top-n tokens by the
  head-averaged importance score). This lengthens the side sequence, which is what made the paper's
  MLP row memory-hungry.
* A random-init LPM (no `--pretrained`, no `--weights`: smoke runs) is created under a fixed seed in a
  forked RNG, so it is the same frozen model in every run and seed (its feature cache is shared, e.g.
  with `petlbench preload`), while the side network's init still follows the run's seed.
* Preloaded features are stored per image (row = sample, ordered by sample id) for the union of all
  splits; the token indices are stored too so the Fig. 9 introspection also works from the cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader

from petlbench.backbones.vit import create_backbone, native_parameter_count
from petlbench.core.method import (
    BackboneSpec,
    Batch,
    BuildContext,
    Method,
    OneOffWork,
    ParamConvention,
    PetlModel,
    Prepared,
    View,
)
from petlbench.core.options import OptionError, option
from petlbench.engine.step import flush_denormals
from petlbench.fpt.cache import (
    BATCH_PREFIX,
    CacheSpec,
    FeatureStore,
    Log,
    PreloadedDataset,
    ensure_cache,
    module_digest,
    samples_fingerprint,
)
from petlbench.fpt.lpm import INDICES, BareForward, FrozenLPM
from petlbench.fpt.side_network import (
    FinePromptFusion,
    MLPFusion,
    SidePromptFusion,
    build_side_vit,
    side_attention_to_extras,
    side_forward,
)

LPM_VIEW, SIDE_VIEW, SHARED_VIEW = "lpm", "side", "image"
SIDE_RES_REFERENCE = 512  # LPM resolution at which the papers give the side input size
ASSUMED_PATCH = 16
RANDOM_LPM_SEED = 0  # seed of a random-init LPM (no --pretrained/--weights): identical in every run


@dataclasses.dataclass(frozen=True)
class SideTuningOptions:
    """Options shared by FPT and FPT+ (defaults: the official FPT+ configuration)."""

    num_prompts: int = option(16, "fine-grained prompts per fed layer (P)")
    reduction: int = option(8, "reduction factor k: side width = LPM width / k")
    side_layers: int | None = option(
        6, "side-network depth L_S = number of LPM layers fed; unset = len(lpm_layers) or every LPM block"
    )
    side_res: int | None = option(
        None, "side input size in px; unset = paper size (128 FPT+/224 FPT), scaled down below it"
    )
    token_ratio: float = option(0.2, "share of tokens kept per head: n = max(1, floor(ratio * N)), N incl. class")
    lpm_layers: tuple[int, ...] | None = option(None, "0-based LPM blocks feeding side blocks 0.. (default: top L_S)")
    importance: Literal["global", "class_token"] = option(
        "global", "token importance: mean attention paid by all tokens, or by the class token"
    )
    fusion: Literal["cross_attention", "mlp"] = option(
        "cross_attention", "fusion modules (prompts cross-attend to LPM K/V) or the MLP ablation"
    )
    use_lpm: bool = option(True, "false = side network alone (no LPM knowledge)")
    asymmetric: bool = option(True, "false = side and LPM share one augmented image at the LPM resolution")
    token_selection: bool = option(True, "false = pass all LPM tokens to the fusion")
    preload: bool = option(True, "cache LPM features once before training (false = run the LPM every step)")
    cache_dtype: Literal["float16", "float32"] = option("float16", "storage dtype of preloaded features")
    cache_verify: Literal["first-open", "size", "checksum"] = option(
        "first-open",
        "cache validation on open: sha256 of every file the first time a process opens it (default), file sizes "
        "only, or sha256 on every open",
    )
    fusion_dropout: float = option(0.5, "dropout on the fused side-width tokens")
    preload_batch_size: int = option(16, "images per LPM forward while preloading")
    preload_workers: int = option(2, "data-loader workers while preloading")

    def __post_init__(self) -> None:
        for name in ("num_prompts", "reduction", "side_layers", "preload_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.preload_workers < 0:
            raise ValueError("preload_workers must be >= 0")
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError(f"token_ratio {self.token_ratio} must lie in (0, 1]")
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ValueError(f"fusion_dropout {self.fusion_dropout} must lie in [0, 1)")
        if self.side_res is not None and self.side_res < 1:
            raise ValueError("side_res must be positive")
        if self.side_res is not None and not self.asymmetric:
            raise ValueError("side_res needs asymmetric=true (without it the side reads the LPM resolution)")
        if self.lpm_layers is not None:
            layers = list(self.lpm_layers)
            if self.side_layers is not None and len(layers) != self.side_layers:
                raise ValueError(f"lpm_layers lists {len(layers)} blocks for side_layers={self.side_layers}")
            if layers != sorted(set(layers)) or layers[0] < 0:
                raise ValueError("lpm_layers must be distinct, increasing, 0-based block indices")


def resolve_side_res(side_res: int | None, res: int, patch: int | None, base: int, asymmetric: bool) -> int:
    """Side input size: `res` without asymmetric input, else `side_res`, else the documented auto rule.

    `patch=None` (patch size not known yet) skips the multiple-of-patch check of an explicit `side_res`
    and lets the auto rule assume patch 16.
    """
    if not asymmetric:
        return res
    if side_res is not None:
        if patch is not None and side_res % patch:
            raise ValueError(f"side_res {side_res} is not a multiple of the patch size {patch}")
        return side_res
    patch = patch or ASSUMED_PATCH
    target = base if res >= base else res * base / SIDE_RES_REFERENCE
    return max(patch, patch * math.floor(target / patch + 0.5))


def _unique_samples(samples: Sequence[Any]) -> list[Any]:
    by_id = {sample.sample_id: sample for sample in samples}
    return [by_id[key] for key in sorted(by_id)]


class SideTuningModel(PetlModel):
    """LPM (frozen, optional) + fusion (optional) + side network; `forward(batch)` gives the side's logits.

    Batches carry the side view and either the LPM view (online) or preloaded `lpm_*` features.
    """

    def __init__(
        self,
        method: SideTuningMethod,
        side: VisionTransformer,
        lpm: FrozenLPM | None,
        fusion: nn.Module | None,
        res: int,
    ) -> None:
        super().__init__()
        self.lpm = lpm
        self.fusion = fusion
        self.side = side
        self.method = method
        self.res = res
        asymmetric = method.options.asymmetric
        self.side_view = SIDE_VIEW if asymmetric else SHARED_VIEW
        self.lpm_view = LPM_VIEW if asymmetric else SHARED_VIEW
        self.preloaded = False
        self.backbone_name = ""  # the LPM's timm name, for the official parameter count

    def lpm_features(self, batch: Batch, keep_indices: bool = False) -> dict[str, torch.Tensor]:
        """LPM features for a batch: the preloaded `lpm_*` tensors (as float32) or an online LPM pass."""
        cached = {k[len(BATCH_PREFIX) :]: v for k, v in batch.items() if k.startswith(BATCH_PREFIX)}
        if cached:
            features = {k: (v.long() if k == INDICES else v.float()) for k, v in cached.items()}
        elif self.preloaded:
            raise RuntimeError("features were preloaded but this batch carries none (was prepare_data skipped?)")
        elif self.lpm is None:
            raise RuntimeError("this model has no LPM (use_lpm=false)")
        else:
            features = self.lpm(batch[self.lpm_view])
        if not keep_indices:
            features.pop(INDICES, None)
        return features

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits `[B, C]`."""
        extras = self.fusion(self.lpm_features(batch)) if self.fusion is not None else None
        return side_forward(self.side, batch[self.side_view], extras)

    def _no_preload_reason(self) -> str | None:
        options = self.method.options
        if self.lpm is None:
            return "use_lpm=false: there is no LPM"
        if not options.asymmetric:
            return "asymmetric=false: the LPM reads the augmented shared image, which cannot be cached"
        if not options.preload:
            return "preload=false"
        return None

    def prepare_data(self, splits: Mapping[str, Any], ctx: BuildContext) -> Prepared:
        """Preload the LPM features of every split into the on-disk cache, when this configuration allows."""
        reason = self._no_preload_reason()
        if reason is not None:
            if self.lpm is not None:
                ctx.log(f"{self.method.display_name}: not preloading ({reason}); the LPM runs online every step")
            info = {
                "preloaded": False,
                "reason": reason,
                "preload_seconds": None,
                "cache_bytes": None,
                "cache_reused": None,
            }
            return Prepared(dict(splits), info)
        assert self.lpm is not None
        datasets = dict(splits)
        samples = [s for ds in datasets.values() for s in ds.samples]
        first = next(iter(datasets.values()))
        if any(tuple(ds.mean) != tuple(first.mean) or tuple(ds.std) != tuple(first.std) for ds in datasets.values()):
            raise ValueError("splits are normalised differently; one feature cache cannot serve them")
        store, info = self.method.ensure_features(
            self.lpm,
            samples,
            first.mean,
            first.std,
            self.res,
            ctx.backbone,
            Path(ctx.cache_dir),
            ctx.log,
            ctx.device,
            recheck=ctx.recheck,
        )
        self.preloaded = True
        return Prepared(
            {name: self._with_features(ds, store) for name, ds in datasets.items()}, {"preloaded": True, **info}
        )

    def assume_prepared(self) -> None:
        """Consume preloaded features from now on, when this configuration preloads (profilers, no data)."""
        self.preloaded = self._no_preload_reason() is None

    def one_off_work(self) -> OneOffWork | None:
        """The LPM's feature-extraction pass over every image, when features are preloaded."""
        if self.lpm is None or not self.preloaded:
            return None
        return OneOffWork(self.lpm, self.lpm_view, self.res, floor=BareForward(self.lpm))

    def _with_features(self, dataset: Any, store: FeatureStore) -> PreloadedDataset:
        side_only = dataset.with_views({self.side_view: dataset.views[self.side_view]})
        return PreloadedDataset(side_only, store)

    def example_batch(self, views: Mapping[str, View], batch_size: int, device: torch.device | str = "cpu") -> Batch:
        """Random inputs shaped like one training batch in the current mode (preloaded or online), for probes."""
        side_res = int(self.side.patch_embed.img_size[0])
        batch: Batch = {self.side_view: torch.randn(batch_size, 3, side_res, side_res, device=device)}
        if self.lpm is not None and self.preloaded:
            dtype = getattr(torch, self.method.options.cache_dtype)
            tokens = self.lpm.num_tokens(self.res)
            for name, (shape, kind) in self.lpm.feature_shapes(self.res).items():
                batch[BATCH_PREFIX + name] = (
                    torch.randint(0, tokens, (batch_size, *shape), device=device)
                    if kind == "index"
                    else torch.randn(batch_size, *shape, device=device, dtype=dtype)
                )
        elif self.lpm is not None and self.lpm_view != self.side_view:
            batch[self.lpm_view] = torch.randn(batch_size, 3, self.res, self.res, device=device)
        batch["label"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return batch

    def introspect(self, batch: Batch) -> dict[str, Any] | None:
        """`fusion_attention_maps` of this batch; None when there is no LPM or fusion module to inspect."""
        if self.lpm is None or self.fusion is None:
            return None
        return fusion_attention_maps(self, batch)

    def param_report(self, convention: ParamConvention = "petlbench") -> tuple[int, int]:
        """(trainable, total); `official` counts the LPM as the authors' code instantiates it: the pre-trained
        model at its native size, with its position table unresampled and its unused classification head."""
        trainable, total = super().param_report()
        if convention == "official" and self.lpm is not None:
            held = sum(p.numel() for p in self.lpm.parameters())
            total += native_parameter_count(self.backbone_name) - held
        return trainable, total

    def place(self, device: torch.device) -> SideTuningModel:
        """Side and fusion to `device`; the LPM too only when it runs online (preloaded: it stays on the CPU)."""
        if self.lpm is not None:
            self.lpm.to(torch.device("cpu") if self.preloaded else device)
        self.side.to(device)
        if self.fusion is not None:
            self.fusion.to(device)
        return self


class SideTuningMethod(Method):
    """Base of FPT and FPT+: subclasses set the paper's side size and the prompt-fusion module class."""

    Options: ClassVar[type] = SideTuningOptions
    side_res_base: ClassVar[int] = 128
    prompt_fusion: ClassVar[type[nn.Module]] = FinePromptFusion
    # the authors' code stores preloaded keys and values as float32 (effect of float16: <= 6e-6 on logits)
    preset_options: ClassVar[Mapping[str, Mapping[str, Any]]] = {"paper": {"cache_dtype": "float32"}}

    def side_res(self, res: int, patch: int | None = None) -> int:
        """Side-network input size at LPM resolution `res` (see the module docstring for the rule)."""
        o = self.options
        return resolve_side_res(o.side_res, res, patch, self.side_res_base, o.asymmetric)

    def views(self, res: int) -> dict[str, View]:
        """Fixed LPM view + augmented side view; one shared augmented view without asymmetric input."""
        o = self.options
        if not o.asymmetric:
            return {SHARED_VIEW: View(res, augment=True)}
        side = View(self.side_res(res), augment=True)
        return {LPM_VIEW: View(res, augment=False), SIDE_VIEW: side} if o.use_lpm else {SIDE_VIEW: side}

    def side_depth(self, lpm_depth: int) -> int:
        """Side-network depth L_S: `side_layers`, else the length of `lpm_layers`, else the LPM depth."""
        o = self.options
        if o.side_layers is not None:
            return o.side_layers
        return len(o.lpm_layers) if o.lpm_layers is not None else lpm_depth

    def lpm_layer_indices(self, depth: int) -> tuple[int, ...]:
        """LPM blocks feeding side blocks 0..L_S-1: `lpm_layers`, or the top L_S blocks."""
        o = self.options
        side_depth = self.side_depth(depth)
        if side_depth > depth:
            raise ValueError(f"side_layers={side_depth} exceeds the LPM depth {depth}")
        layers = tuple(o.lpm_layers) if o.lpm_layers is not None else tuple(range(depth - side_depth, depth))
        if layers[-1] >= depth:
            raise ValueError(f"lpm_layers {list(layers)} exceed the LPM depth {depth}")
        return layers

    def build_lpm(self, backbone: BackboneSpec, res: int) -> FrozenLPM:
        """The frozen, head-less LPM at `res` set up for this configuration's feature extraction."""
        o = self.options
        if backbone.pretrained or backbone.weights:
            vit = create_backbone(backbone, res, num_classes=0)
        else:  # a random-init LPM is a fixed stand-in: same weights in every run, global RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_LPM_SEED)
                vit = create_backbone(backbone, res, num_classes=0)
        return FrozenLPM(
            vit,
            self.lpm_layer_indices(len(vit.blocks)),
            token_ratio=o.token_ratio if o.token_selection else None,
            importance=o.importance,
            feature="hidden" if o.fusion == "mlp" else "kv",
        )

    def build(self, ctx: BuildContext) -> SideTuningModel:
        """LPM (if used), fusion module and a side ViT of width D/k with the LPM's heads and MLP ratio."""
        o = self.options
        lpm: FrozenLPM | None = None
        if o.use_lpm:
            lpm = self.build_lpm(ctx.backbone, ctx.res)
            vit = lpm.vit
        else:
            with torch.device("meta"):  # architecture only; nothing is allocated or counted
                vit = create_backbone(BackboneSpec(name=ctx.backbone.name), ctx.res, num_classes=0)
        first: Any = vit.blocks[0]  # timm Block or a look-alike: the class varies with the model
        width, heads = int(vit.embed_dim), int(first.attn.num_heads)
        patch = int(vit.patch_embed.patch_size[0])
        if width % o.reduction:
            raise ValueError(f"LPM width {width} is not divisible by reduction={o.reduction}")
        side_width = width // o.reduction
        side_depth = self.side_depth(len(vit.blocks))
        if side_depth > len(vit.blocks):
            raise ValueError(f"side_layers={side_depth} exceeds the LPM depth {len(vit.blocks)}")
        side_res = self.side_res(ctx.res, patch)
        if o.asymmetric and o.side_res is None and side_res != self.side_res(ctx.res):
            raise ValueError(f"the automatic side size assumes patch {ASSUMED_PATCH}; set side_res for patch {patch}")
        side = build_side_vit(
            img_size=side_res,
            patch_size=patch,
            width=side_width,
            depth=side_depth,
            num_heads=heads,
            mlp_ratio=first.mlp.fc1.out_features / width,
            num_classes=ctx.num_classes,
            qkv_bias=first.attn.qkv.bias is not None,
        )
        fusion: nn.Module | None = None
        if lpm is not None:
            if o.fusion == "mlp":
                fusion = MLPFusion(width, side_width, o.fusion_dropout)
            else:
                fusion = self.prompt_fusion(side_depth, o.num_prompts, width, side_width, heads, o.fusion_dropout)
        model = SideTuningModel(self, side, lpm, fusion, ctx.res)
        model.backbone_name = ctx.backbone.name
        ctx.log(self.describe(model, ctx.res, side_res))
        return model

    def describe(self, model: SideTuningModel, res: int, side_res: int) -> str:
        """One line saying what was built."""
        o = self.options
        side = model.side
        side_attn: Any = side.blocks[0].attn  # timm Attention (blocks are typed as plain modules)
        text = (
            f"{self.display_name}: side ViT {side.embed_dim}-wide x {len(side.blocks)} blocks at {side_res} px, "
            f"{side_attn.num_heads} heads"
        )
        if model.lpm is None:
            return text + "; no LPM (side network alone)"
        lpm = model.lpm
        tokens = f"{lpm.num_selected(res)}/{lpm.num_tokens(res)} tokens per head"
        fusion = "MLP fusion" if o.fusion == "mlp" else f"{o.num_prompts} prompts per layer"
        return (
            f"{text}; LPM at {res} px, blocks {list(lpm.layers)}, {fusion}, {tokens}"
            f"{'' if o.asymmetric else ', shared input'}"
        )

    def cache_spec(
        self,
        lpm: FrozenLPM,
        backbone: BackboneSpec,
        res: int,
        samples: Sequence[Any],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> CacheSpec:
        """What identifies this configuration's feature cache (see `petlbench.fpt.cache`)."""
        o = self.options
        config = {
            "backbone": backbone.name,
            "weights": backbone.weights_label,
            "weights_digest": module_digest(lpm.vit),
            "res": res,
            "layers": list(lpm.layers),
            "feature": lpm.feature,
            "token_ratio": lpm.token_ratio,
            "importance": lpm.importance if lpm.token_ratio is not None else None,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "view": "resize-antialias-totensor-normalize",
            "images": samples_fingerprint(samples),
            "dtype": o.cache_dtype,
        }
        return CacheSpec(
            config=config,
            arrays=lpm.feature_shapes(res),
            sample_ids=tuple(s.sample_id for s in samples),
            dtype=o.cache_dtype,
            label=f"{backbone.name}-{res}px",
        )

    def ensure_features(
        self,
        lpm: FrozenLPM,
        samples: Sequence[Any],
        mean: Sequence[float],
        std: Sequence[float],
        res: int,
        backbone: BackboneSpec,
        cache_dir: Path,
        log: Log,
        device: torch.device,
        recheck: bool = False,
    ) -> tuple[FeatureStore, dict[str, Any]]:
        """Open or build the feature cache of `samples` (deterministic LPM view, no augmentation); `recheck`
        re-hashes every file of an existing cache whatever `cache_verify` says."""
        from petlbench.data.views import ViewDataset

        unique = _unique_samples(samples)
        spec = self.cache_spec(lpm, backbone, res, unique, mean, std)
        o = self.options

        def produce():  # runs the LPM only when the cache must be (re)built
            dataset = ViewDataset(unique, {LPM_VIEW: View(res, augment=False)}, train=False, mean=mean, std=std)
            # decoding in worker processes and, on CUDA, pinned pages copied asynchronously keep the LPM busy
            loader = DataLoader(
                dataset,
                batch_size=o.preload_batch_size,
                shuffle=False,
                num_workers=o.preload_workers,
                pin_memory=device.type == "cuda",
            )
            home = next(lpm.parameters()).device
            lpm.to(device)
            try:
                for batch in loader:
                    flush_denormals()  # (a generator resumes on whatever thread iterates it)
                    features = lpm(batch[LPM_VIEW].to(device, non_blocking=True))
                    ids = [unique[i].sample_id for i in batch["index"].tolist()]
                    yield ids, {name: t.cpu().numpy() for name, t in features.items()}
            finally:
                lpm.to(home)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        return ensure_cache(cache_dir, spec, produce, log, "checksum" if recheck else o.cache_verify)

    def preload_samples(
        self,
        samples: Sequence[Any],
        mean: Sequence[float],
        std: Sequence[float],
        res: int,
        backbone: BackboneSpec,
        cache_dir: Path,
        log: Log,
        device: torch.device,
    ) -> dict[str, Any]:
        """Build (or confirm) the feature cache for `samples` outside a training run; returns preload info."""
        o = self.options
        if not o.use_lpm or not o.asymmetric:
            raise OptionError(
                f"{self.display_name} with use_lpm={o.use_lpm}, asymmetric={o.asymmetric} has no cacheable LPM features"
            )
        lpm = self.build_lpm(backbone, res)
        _, info = self.ensure_features(lpm, samples, mean, std, res, backbone, cache_dir, log, device)
        return info


@torch.no_grad()
def fusion_attention_maps(model: SideTuningModel, batch: Batch) -> dict[str, Any]:
    """Attention maps for the papers' figures, computed in eval mode for one batch.

    Returns:
      * `lpm_layers`: the LPM blocks feeding side blocks 0..L_S-1;
      * `selected_indices` `[B, L, H, n]` (per-head token positions; `[B, L, n]` for MLP fusion), or None
        when every token is kept. Position 0 is the class token; position t >= 1 is patch t-1 of the
        `grid` x `grid` LPM patch grid, row-major (Fig. 9);
      * `prompt_attention` `[B, L, H, P, n]`: attention each prompt pays to the selected tokens
        (None for MLP fusion);
      * `side_attention` `[B, L_S, H, N_side, T]`: attention the side's class+patch tokens pay to the
        appended prompts (or MLP tokens) in every side block;
      * `side_attention_mass` `[L_S]`: that attention summed over the appended tokens and averaged over
        images, heads and side tokens — the per-layer "average attention score on the prompts" (Fig. 5).
    """
    if model.lpm is None or model.fusion is None:
        raise ValueError("attention maps need the LPM and a fusion module (use_lpm=true)")
    was_training = model.training
    model.eval()
    try:
        features = model.lpm_features(batch, keep_indices=True)
        indices = features.pop(INDICES, None)
        prompt_attention = None
        if isinstance(model.fusion, (FinePromptFusion, SidePromptFusion)):
            prompt_attention = model.fusion.attention(features).transpose(0, 1)
        extras = model.fusion(features)
        side_maps = torch.stack(side_attention_to_extras(model.side, batch[model.side_view], extras), dim=1)
    finally:
        model.train(was_training)
    patch = int(model.lpm.vit.patch_embed.patch_size[0])
    return {
        "lpm_layers": list(model.lpm.layers),
        "grid": model.res // patch,
        "num_prefix_tokens": int(model.lpm.vit.num_prefix_tokens),
        "selected_indices": indices,
        "prompt_attention": prompt_attention,
        "side_attention": side_maps,
        "side_attention_mass": side_maps.sum(dim=-1).mean(dim=(0, 2, 3)),
    }


def preload(
    method: Method | str,
    source: Any,
    res: int,
    backbone: BackboneSpec,
    cache_dir: str | Path,
    log: Log = print,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run the frozen LPM of an FPT/FPT+ `method` once over every image of `source` and cache its features.

    Returns the preload info (cache path, bytes, whether it was reused, seconds). A later training run
    with the same method options, backbone, resolution and data reuses the cache.
    """
    from petlbench.core.method import get_method

    if isinstance(method, str):
        method = get_method(method).from_overrides()
    if not isinstance(method, SideTuningMethod):
        raise OptionError(f"preloading applies to FPT and FPT+ only, not {type(method).__name__}")
    return method.preload_samples(
        source.samples,
        source.mean,
        source.std,
        res,
        backbone,
        Path(cache_dir),
        log,
        torch.device(device) if device is not None else torch.device("cpu"),
    )
