"""Token sequences: a vision transformer's patch tokens compared as the map of their cells.

Oracles: a ViT whose patch embedding is D4-symmetric and which has no position embedding is
exactly D4-equivariant at every block (attention, layer norms and MLPs act on each token alike
or on all tokens alike), at an input size whose patch grid is centred; a learned position
embedding breaks it from the first block on. The cells of a sequence are the map it was
flattened from, exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from models_zoo import d4_symmetrise_
from torch import nn

import eqaudit
from eqaudit.grids import AxisGrid, TokenLayout, export_grid_graph

SIZE, PATCH = 32, 8  # a 4x4 patch grid, stride 8, centred (3.5 + 8 * 1.5 = 15.5)


class Attention(nn.Module):
    """timm's Attention: fused scaled dot-product attention, or the explicit product with the
    scores handed out by a Dropout module (attn_drop)."""

    def __init__(self, dim: int, heads: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, fused: bool) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A ViT as timm writes it: patch embedding, class token, position embedding, blocks, the
    class token's (or the cells' mean) features into the head."""

    def __init__(self, cls: bool = True, pos: bool = True, fused: bool = True, pool: str = "cls"):
        super().__init__()
        dim, cells = 16, (SIZE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, cells + cls, dim)) if pos else None
        self.blocks = nn.Sequential(Block(dim, fused), Block(dim, fused))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        first = 1 if self.cls_token is not None else 0
        return self.head(x[:, 0] if self.pool == "cls" else x[:, first:].mean(1))


def vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return d4_symmetrise_(ViT(**kwargs)).eval()


VARIANTS = {
    "cls token, fused attention": {},
    "explicit attention, mean pool": {"fused": False, "pool": "mean"},
    "no class token": {"cls": False, "pool": "mean"},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_vits_blocks_are_token_sequences_on_the_patch_grid(name: str) -> None:
    kwargs = VARIANTS[name]
    graph, reason = export_grid_graph(vit(**kwargs), torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None, reason
    grids, layouts = graph.grids(SIZE, SIZE), graph.token_layouts(SIZE, SIZE)
    patches = AxisGrid(4, 8.0, 3.5, (0, 3))
    assert grids["patch_embed"].h == patches
    prefix = 0 if kwargs.get("cls") is False else 1
    for layer in ("blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.attn", "blocks.1", "norm"):
        assert grids[layer] is not None, graph.unknown_reason(layer, SIZE, SIZE)
        assert (grids[layer].h.n, grids[layer].h.stride, grids[layer].h.offset) == (4, 8.0, 3.5)
        assert layouts[layer] == TokenLayout(0, 1, prefix, 4, 4)
    # Before any attention a token reads its own patch; after it, every patch.
    assert grids["blocks.0.norm1"].h.free == (0, 3)
    assert grids["blocks.0.attn"].h.free == grids["blocks.1"].h.free == (0, -1)
    assert grids["head"] == "flat"
    if not kwargs.get("fused", True):  # the scores a Dropout hands out are not a sequence
        assert grids["blocks.0.attn.attn_drop"] is None
        assert "attn_drop" not in layouts


def test_the_cells_of_a_sequence_are_the_map_it_was_flattened_from() -> None:
    torch.manual_seed(0)
    image_map = torch.randn(2, 6, 3, 5)
    tokens = torch.cat([torch.randn(2, 2, 6), image_map.flatten(2).transpose(1, 2)], 1)
    assert torch.equal(TokenLayout(0, 1, 2, 3, 5).as_map(tokens), image_map)
    per_head = tokens.reshape(2, 17, 2, 3).permute(0, 2, 1, 3)  # (B, heads, N, C / heads)
    assert torch.equal(TokenLayout(0, 2, 2, 3, 5).as_map(per_head), image_map)
    assert TokenLayout(0, 1, 1, 3, 5).as_map(tokens) is None  # 16 cells are not 17 tokens


def test_a_symmetric_vit_without_position_embedding_is_exact_at_every_block() -> None:
    result = eqaudit.audit(vit(pos=False), "d4", input_size=SIZE, num_images=6, seed=0)
    blocks = [
        r for r in result.layers if r["layer"].startswith("blocks") and r["transform"] != "id"
    ]
    assert {r["layer"] for r in blocks} >= {"blocks.0.attn.qkv", "blocks.0.attn", "blocks.1"}
    for row in blocks:
        assert row["kind"] == "spatial" and row["shape"] in ("16x4x4", "48x4x4", "32x4x4")
        assert row["comparison"] == "exact" and row["scored"], row
        assert row["relative_error_max"] < 1e-5, row
    assert not result.summary["geometry"]["not_audited"]
    note = next(n for n in result.summary["geometry"]["notes"] if "token sequences" in n)
    assert note.startswith("17 layers are token sequences (blocks.0.norm1, ")
    assert note.endswith(
        "the 1 token in front of the patches (a class token, register tokens) is left out"
    )


def test_a_position_embedding_breaks_equivariance_from_the_first_block() -> None:
    result = eqaudit.audit(vit(pos=True), "d4", input_size=SIZE, num_images=6, seed=0)
    assert result.layer("patch_embed", "rot90")["relative_error"] < 1e-5  # before the embedding
    for layer in ("blocks.0.norm1", "blocks.1", "norm"):
        assert result.layer(layer, "rot90")["relative_error"] > 1e-3, layer


def test_a_patch_grid_off_the_image_centre_is_flagged() -> None:
    # 36 px: the 4x4 patches cover 0..31, centred at 15.5, not 17.5
    result = eqaudit.audit(vit(pos=False), "flips", input_size=36, num_images=4, seed=0)
    row = result.layer("blocks.1", "flip_h")
    assert row["aligned"] is False and not row["scored"] and "misaligned" in row["reason"]


class Hybrid(nn.Module):
    """Tokens folded back into their map (a pyramid transformer's stage end), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.mix = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.embed(x)
        b, c, h, w = m.shape
        t = self.mix(m.flatten(2).transpose(1, 2))
        m = self.conv(t.transpose(1, 2).reshape(b, c, h, w))
        return self.head(m.mean((2, 3)))


def test_a_sequence_folded_back_into_its_map_keeps_the_grid() -> None:
    graph, reason = export_grid_graph(Hybrid().eval(), torch.zeros(1, 3, 20, 20))
    assert graph is not None, reason
    grids = graph.grids(20, 20)
    assert grids["mix"].h == AxisGrid(5, 4.0, 1.5, (0, 4))
    assert grids["conv"].h == AxisGrid(5, 4.0, 1.5, (1, 3))  # a 3x3 conv on the 5x5 map
    assert "conv" not in graph.token_layouts(20, 20)  # a map again


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda t: t[:, 2:5], "slices the token axis"),
        (lambda t: torch.roll(t, 1, 1), "aten::roll"),
        (lambda t: t[:, 3], "picks one token of a sequence"),
        (lambda t: t.reshape(t.shape[0], 4, -1), "reshapes a token sequence across its token axis"),
    ],
)
def test_what_is_not_understood_on_a_sequence_is_unknown(fn, reason) -> None:  # type: ignore[no-untyped-def]
    class Tail(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return fn(t)

    model = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 8, 4, 4), tokens=_Tokens(), layer=Tail())
    ).eval()
    graph, _ = export_grid_graph(model, torch.zeros(1, 3, 16, 16))
    assert graph is not None
    assert graph.grids(16, 16)["tokens"] is not None
    assert graph.grids(16, 16)["layer"] is None
    assert reason in graph.unknown_reason("layer", 16, 16)


class _Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def test_a_vit_export_archive_gives_the_modules_numbers(tmp_path) -> None:
    model = vit(pos=True)
    path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),)), path)
    archive = eqaudit.audit(str(path), "d4", num_images=4, seed=0)
    module = eqaudit.audit(model, "d4", input_size=SIZE, num_images=4, seed=0)
    for layer in ("blocks.0.attn", "blocks.1", "norm"):
        a, m = archive.layer(layer, "rot90"), module.layer(layer, "rot90")
        assert a["scored"] and a["relative_error"] == pytest.approx(m["relative_error"], rel=1e-4)


def test_lie_contributions_say_they_skip_token_sequences() -> None:
    result = eqaudit.audit(vit(pos=False), "flips", input_size=SIZE, num_images=2, lie=True)
    reasons = {r["layer"]: r["reason"] for r in result.summary["lie"]["layers"]}
    assert reasons["patch_embed"] is None  # a map: its contribution is computed
    assert reasons["blocks.1"].startswith("a token sequence: contributions are computed on maps")


class EncoderBlock(nn.Module):
    """torchvision's ViT block: nn.MultiheadAttention on (B, N, C), or (N, B, C) sequences."""

    def __init__(self, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.ln_1 = nn.LayerNorm(16)
        self.self_attention = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(tokens)
        x, _ = self.self_attention(x, x, x, need_weights=self.need_weights)
        x = x + tokens
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False, pos: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.conv_proj = nn.Conv2d(3, 16, PATCH, PATCH)
        self.class_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, 16)) if pos else None
        self.layers = nn.Sequential(*(EncoderBlock(batch_first, need_weights) for _ in range(2)))
        self.ln = nn.LayerNorm(16)
        self.heads = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        x = x if self.batch_first else x.transpose(0, 1)
        x = self.ln(self.layers(x))
        x = x if self.batch_first else x.transpose(0, 1)
        return self.heads(x[:, 0])


@pytest.mark.parametrize(
    ("batch_first", "need_weights"), [(True, False), (False, False), (True, True)]
)
def test_multihead_attention_modules_keep_the_querys_sequence(batch_first, need_weights) -> None:  # type: ignore[no-untyped-def]
    # nn.MultiheadAttention merges the batch axis with the heads' and the tokens' inside: read
    # whole, its output is the query's sequence (sequence-first too: token axis 0, batch 1).
    torch.manual_seed(0)
    model = d4_symmetrise_(TorchvisionViT(batch_first, need_weights)).eval()
    graph, reason = export_grid_graph(model, torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None, reason
    layout = graph.token_layouts(SIZE, SIZE)["layers.1"]
    assert layout == TokenLayout(0 if batch_first else 1, 1 if batch_first else 0, 1, 4, 4)
    assert graph.grids(SIZE, SIZE)["layers.0.self_attention"].h.free == (0, -1)
    result = eqaudit.audit(model, "d4", input_size=SIZE, num_images=4, seed=0)
    rows = [r for r in result.layers if r["layer"].startswith("layers") and r["transform"] != "id"]
    assert {r["layer"] for r in rows} >= {"layers.0.self_attention", "layers.1"}
    assert all(r["scored"] and r["relative_error_max"] < 1e-5 for r in rows)


class AttentionUses(nn.Module):
    """An nn.MultiheadAttention over patch tokens: self-attention whose weights are used too,
    cross-attention from 16 learned queries (as many as the patches), or self-attention on a
    map flattened channels-as-tokens (the module attends along its channels)."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.embed = nn.Conv2d(3, 16, PATCH, PATCH)
        self.latents = nn.Parameter(torch.randn(1, 16, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=use != "weights, sequence-first")
        self.after = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.embed(x)
        tokens = m.flatten(2) if self.use == "channels" else m.flatten(2).transpose(1, 2)
        if self.use == "cross":
            out, _ = self.attn(self.latents.expand(x.shape[0], -1, -1), tokens, tokens)
        elif self.use == "weights, sequence-first":  # (the weights come after the output)
            out, weights = self.attn(*[tokens.transpose(0, 1)] * 3)
            out = out.transpose(0, 1) + weights.mean(-1, keepdim=True)
        else:
            out, weights = self.attn(tokens, tokens, tokens)
            out = out + weights.mean(-1, keepdim=True)
        return self.head(self.after(out).mean(1))


@pytest.mark.parametrize(
    ("use", "known"),
    [("weights", True), ("weights, sequence-first", True), ("cross", False), ("channels", False)],
)
def test_only_self_attention_along_the_tokens_is_followed(use: str, known: bool) -> None:
    # (review) cross-attention from 16 learned queries read as the patch map, scored at 0.19
    # where its output is invariant; a map flattened channels-as-tokens kept its layout
    # through an attention along the channels; used weights were taken for the output.
    torch.manual_seed(0)
    graph, reason = export_grid_graph(AttentionUses(use).eval(), torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None, reason
    grid = graph.grids(SIZE, SIZE)["attn"]
    assert (grid is not None) == known, graph.unknown_reason("attn", SIZE, SIZE)
    if not known:
        assert "attn" not in graph.token_layouts(SIZE, SIZE)


class MapAndAttention(nn.Module):
    """A block whose first output is a map made from the tokens, its second the attention's."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv2d(16, 16, 3, 2, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        grid = (tokens + a).transpose(1, 2).reshape(tokens.shape[0], 16, 4, 4)
        return self.conv(grid), a


class SharedEncoder(nn.Module):
    """One nn.TransformerEncoderLayer listed twice (its parameters exported once, under the
    first path), and a block returning (map, attention output)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, PATCH, PATCH)
        layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True)
        self.blocks = nn.ModuleList([layer, layer])
        self.block = MapAndAttention()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        grid, a = self.block(tokens)
        return self.head(grid.mean((2, 3)) + a.mean(1))


def test_shared_attention_and_a_block_around_one_keep_their_own_outputs() -> None:
    # (review) a module registered twice has one set of parameter placeholders, named after its
    # first path: its second call counted them as other inputs ("attends across inputs"); and
    # a block returning (map, attention output) was read as the attention's token sequence,
    # scored exact at 0.09 where its first output, a map, is what the adapter compares.
    torch.manual_seed(0)
    model = d4_symmetrise_(SharedEncoder()).eval()
    graph, reason = export_grid_graph(model, torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None, reason
    grids, layouts = graph.grids(SIZE, SIZE), graph.token_layouts(SIZE, SIZE)
    # (the second call of the module listed twice is named as the adapter counts calls)
    assert layouts["blocks.0:1"] == layouts["blocks.0.self_attn:1"] == TokenLayout(0, 1, 0, 4, 4)
    assert "blocks.1" not in graph.grids(SIZE, SIZE)
    assert layouts["block.attn"] == TokenLayout(0, 1, 0, 4, 4)
    assert "block" not in layouts and grids["block"].h == grids["block.conv"].h
    assert grids["block"].h.n == 2 and grids["block"].h.stride == 16.0
    result = eqaudit.audit(model, "d4", input_size=SIZE, num_images=2, seed=0)
    assert not result.summary["geometry"]["not_audited"]  # (blocks.0:1 ... were, named blocks.1)
    for layer in (
        "blocks.0.self_attn",
        "blocks.0",
        "blocks.0.self_attn:1",
        "blocks.0:1",
        "block.attn",
    ):
        row = result.layer(layer, "rot90")
        assert row["scored"] and row["relative_error_max"] < 1e-5, layer


def test_attention_in_an_archive_of_dynamic_batch(tmp_path) -> None:
    # (review) the batch size read outside the attention (a sym_size node) counted as a second
    # input of the call: every attention of a dynamic-batch .pt2 was unknown
    model = TorchvisionViT().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},)
    )
    path = tmp_path / "vit.pt2"
    torch.export.save(program, path)
    from eqaudit.models import load_model

    adapter = load_model(str(path))
    layouts = adapter.grid_graph().token_layouts(SIZE, SIZE)
    assert layouts["layers.1.self_attention"] == TokenLayout(0, 1, 1, 4, 4)


class Misaligned(nn.Module):
    """Two maps on different grids added (a stride-2 conv's and a 2x2 pool's), then tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.proj = nn.Conv2d(3, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.conv(x) + self.pool(self.proj(x))
        return self.mix(m.flatten(2).transpose(1, 2)).mean(1)


def test_a_sequence_of_a_map_of_unknown_grid_says_why() -> None:
    graph, _ = export_grid_graph(Misaligned().eval(), torch.zeros(1, 3, 16, 16))
    assert graph is not None and graph.grids(16, 16)["mix"] is None
    assert "combines maps on different grids" in graph.unknown_reason("mix", 16, 16)


# -- the same sequences in ONNX graphs ---------------------------------------------------------
#: Module paths of :func:`vit` and the scopes of the ONNX tensors the classic exporter writes
#: for them: a module's output is the last tensor of its scope (a layer norm before opset 17
#: is ReduceMean, Sub, Pow ... Add).
ONNX_SCOPES = {
    "patch_embed": "/patch_embed/",
    "blocks.0.norm1": "/blocks/blocks.0/norm1/",
    "blocks.0.attn.qkv": "/blocks/blocks.0/attn/qkv/",
    "blocks.0.attn": "/blocks/blocks.0/attn/proj/",  # (its bias: an Add read by the residual)
    "blocks.0.mlp.1": "/blocks/blocks.0/mlp/mlp.1/",
    "blocks.0.mlp.2": "/blocks/blocks.0/mlp/mlp.2/",
    "blocks.0": "/blocks/blocks.0/",
    "blocks.1": "/blocks/blocks.1/",
    "norm": "/norm/",
}


def onnx_tensor(result, scope: str) -> str:  # type: ignore[no-untyped-def]
    return [r["layer"] for r in result.layers if r["layer"].startswith(scope)][-1]


EXPORTS = {  # how the graph was exported: its input's dynamic axes, opset
    "fixed batch": ({}, 17),
    "dynamic batch": ({0: "batch"}, 17),
    "dynamic size": ({0: "batch", 2: "height", 3: "width"}, 17),
    "opset 14, dynamic size": ({0: "batch", 2: "height", 3: "width"}, 14),
    # (Unsqueeze axes an attribute; the batch size read from a layer norm written out)
    "opset 11, dynamic size": ({0: "batch", 2: "height", 3: "width"}, 11),
    "opset 11, fixed batch": ({}, 11),  # (the image tensor's rank not inferred: the token's)
}


def export_vit(model: nn.Module, path, how: str, size: int = SIZE):  # type: ignore[no-untyped-def]
    axes, opset = EXPORTS[how]
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": axes} if axes else None,
    )
    return str(path)


@pytest.mark.parametrize("how", sorted(EXPORTS))
@pytest.mark.parametrize("variant", ["cls token, fused attention", "explicit attention, mean pool"])
def test_a_vit_exported_to_onnx_gives_the_modules_numbers(tmp_path, how, variant) -> None:  # type: ignore[no-untyped-def]
    # Before, an ONNX ViT's audit was its patch embedding alone: every token sequence "not
    # audited". Its sequences now read as the module's do, layer for layer, with a position
    # embedding that breaks equivariance (0.02-0.7) as without (~1e-7).
    if EXPORTS[how][1] < 14 and "fused" in variant:
        pytest.skip("scaled_dot_product_attention exports from opset 14")
    for pos in (True, False):
        model = vit(pos=pos, **VARIANTS[variant])
        path = export_vit(model, tmp_path / f"vit{pos}.onnx", how)
        graph = eqaudit.audit(path, "d4", input_size=SIZE, num_images=4, seed=0)
        module = eqaudit.audit(model, "d4", input_size=SIZE, num_images=4, seed=0)
        if not EXPORTS[how][0]:  # (its class token, expanded to a batch of 1: now batched)
            assert graph.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
        for layer, scope in ONNX_SCOPES.items():
            tensor = onnx_tensor(graph, scope)
            for element in ("rot90", "flip_h", "transpose"):
                m, g = module.layer(layer, element), graph.layer(tensor, element)
                assert g["scored"] and g["comparison"] == "exact", g
                assert g["shape"] == m["shape"]
                assert g["relative_error"] == pytest.approx(m["relative_error"], rel=1e-4, abs=1e-7)
        rows = [r for r in graph.layers if r["kind"] == "spatial" and r["transform"] != "id"]
        assert len({r["layer"] for r in rows}) >= 40 and all(r["scored"] for r in rows)
        if not pos:  # the oracle: exact at every layer
            assert max(r["relative_error_max"] for r in rows) < 1e-5
        else:
            assert (
                graph.layer(onnx_tensor(graph, "/blocks/blocks.1/"), "rot90")["relative_error"]
                > 1e-3
            )
        # the scores alone are left out; shape arithmetic (sqrt of a head's size) is no layer
        left = graph.summary["geometry"]["not_audited"]
        assert all(name.endswith(("MatMul_output_0", "Softmax_output_0")) for name in left)
        scale_or_class_token = ("/attn/Sqrt", "/attn/Div_output", "/Expand")
        assert not [r for r in graph.layers if any(s in r["layer"] for s in scale_or_class_token)]


def test_onnx_sequences_keep_their_axes_and_prefix_tokens(tmp_path) -> None:
    import onnx

    from eqaudit.grids import onnx_grid_graph

    path = export_vit(vit(pos=False), tmp_path / "vit.onnx", "dynamic size")
    graph = onnx_grid_graph(onnx.load(path), "image", "NCHW")
    for size, cells in ((SIZE, 4), (48, 6)):
        layouts = graph.token_layouts(size, size)
        assert layouts["/blocks/blocks.1/Add_1_output_0"] == TokenLayout(0, 1, 1, cells, cells)
        # (3, batch, heads, tokens, head size): the fused projection split into q, k, v
        assert layouts["/blocks/blocks.0/attn/Split_output_0"] == TokenLayout(1, 3, 1, cells, cells)
        # keys transposed for q @ k^T: the tokens last
        assert layouts["/blocks/blocks.0/attn/Transpose_1_output_0"] == TokenLayout(
            0, 3, 1, cells, cells
        )
        grids = graph.grids(size, size)
        assert grids["/blocks/blocks.0/norm1/LayerNormalization_output_0"].h.free == (0, cells - 1)
        assert grids["/blocks/blocks.1/Add_1_output_0"].h.free == (0, -1)  # after attention
        assert grids["/blocks/blocks.0/attn/Softmax_output_0"] is None
        assert grids["/Gather_1_output_0"] == "flat"  # the class token's features
    assert graph.token_layouts(36, 36)["/norm/LayerNormalization_output_0"].h == 4
    result = eqaudit.audit(path, "flips", input_size=36, num_images=2, seed=0)
    row = result.layer("/blocks/blocks.1/Add_1_output_0", "flip_h")
    assert row["aligned"] is False and not row["scored"] and "misaligned" in row["reason"]
    result = eqaudit.audit(path, "d4", input_size=48, num_images=2, seed=0)
    rows = [r for r in result.layers if r["kind"] == "spatial" and r["transform"] != "id"]
    assert all(r["scored"] and r["shape"].endswith("x6x6") for r in rows)
    assert max(r["relative_error_max"] for r in rows) < 1e-5


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda t: t[:, 2:5], "slices the token axis"),
        (lambda t: torch.roll(t, 1, 1), "slices the token axis"),  # (Slice + Concat)
        (lambda t: t[:, 3], "picks one token of a sequence"),
        (lambda t: t.reshape(t.shape[0], 4, -1), "reshapes a token sequence across its token axis"),
        (lambda t: t.softmax(1), "normalises across tokens"),
        (lambda t: t.sort(1)[0], "is not understood on a token sequence"),
    ],
)
def test_what_is_not_understood_on_an_onnx_sequence_is_unknown(tmp_path, fn, reason) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from eqaudit.grids import onnx_grid_graph

    class Tail(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return fn(t) * 2

    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 4, 4), tokens=_Tokens(), tail=Tail()))
    path = export_vit(model.eval(), tmp_path / "tail.onnx", "dynamic size", size=16)
    graph = onnx_grid_graph(onnx.load(path), "image", "NCHW")
    last = onnx.load(path).graph.output[0].name
    assert graph.grids(16, 16)["/tokens/Transpose_output_0"] is not None
    assert graph.grids(16, 16)[last] is None
    assert reason in graph.unknown_reason(last, 16, 16)


class ViewedViT(nn.Module):
    """Patch tokens by ``x.view(b, c, -1)`` (PVT, non-local blocks), which an ONNX graph writes
    as a GroupNorm's fold is written: a Reshape to ``(B, C, -1)``; then a GroupNorm of one
    channel per group on the map, folded the same way; a batch-merged attention ``(B * heads,
    N, d)`` through ``bmm``, which the walk does not follow; and a per-token score ``t @ v``
    (rank 2), flipped."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, PATCH, PATCH)
        self.norm = nn.GroupNorm(8, 8)
        self.mix = nn.Linear(8, 8)
        self.qkv = nn.Linear(8, 24)
        self.v = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.norm(self.embed(x))
        b, c = m.shape[:2]
        t = self.mix(m.view(b, 8, -1).transpose(1, 2))  # (B, N, C): C written in
        n = t.shape[1]
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = (z.reshape(b * 2, n, 4) for z in (q, k, v))  # heads merged into the batch
        o = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        o = o.reshape(b, 2, n, 4).transpose(1, 2).reshape(b, n, c)
        score = (t @ self.v).flip(-1).unsqueeze(-1)  # (B, N, 1), the tokens reversed
        return self.head((o + score).mean(1))


@pytest.mark.parametrize("how", ["fixed batch", "dynamic size"])
def test_onnx_sequences_of_a_view_and_what_is_left_unknown(tmp_path, how) -> None:  # type: ignore[no-untyped-def]
    # (review) x.view(b, c, -1) was read as a GroupNorm's fold, and lost: every layer after it
    # unknown; a MatMul by a 1-D constant kept the sequence's rank, and the flip after it read
    # axis -1 as a channel axis: the reversed tokens scored "exact" at 0.12; a Reshape reading
    # the batch size from the image cut the per-head tensors off their token descent, and they
    # were audited as (heads, tokens, d) images.
    import onnx

    from eqaudit.grids import onnx_grid_graph

    torch.manual_seed(0)
    model = d4_symmetrise_(ViewedViT()).eval()
    path = export_vit(model, tmp_path / "viewed.onnx", how)
    graph = onnx_grid_graph(onnx.load(path), "image", "NCHW")
    layouts = graph.token_layouts(SIZE, SIZE)
    assert layouts["/mix/MatMul_output_0"] == TokenLayout(0, 1, 0, 4, 4)
    # the GroupNorm's fold, still a fold: its map's grid after the InstanceNormalization
    assert graph.grids(SIZE, SIZE)["/norm/Add_output_0"].h == AxisGrid(4, 8.0, 3.5, (0, -1))
    assert "/MatMul_output_0" not in layouts and "/Slice_output_0" not in layouts
    result = eqaudit.audit(path, "d4", input_size=SIZE, num_images=3, seed=0)
    scored = [r for r in result.layers if r["scored"] and r["transform"] != "id"]
    assert {r["layer"] for r in scored} >= {"/mix/MatMul_output_0", "/qkv/Add_output_0"}
    spatial = [r for r in scored if r["kind"] == "spatial"]
    assert max(r["relative_error_max"] for r in spatial) < 1e-5  # (D4-symmetric)
    per_head = [n for n in result.summary["geometry"]["not_audited"] if "Transpose" in n]
    assert per_head and not [r for r in result.layers if r["layer"] in per_head]


def export_dynamo(model: nn.Module, path, dynamic: bool) -> str:  # type: ignore[no-untyped-def]
    """``torch.onnx.export``'s default exporter (dynamo, onnxscript), its output quieted."""
    import contextlib
    import io
    import logging
    import warnings

    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        shapes = ({0: torch.export.Dim("batch", max=64), 2: auto, 3: auto},)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with quiet[0], quiet[1], warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            program = torch.onnx.export(
                model, (torch.zeros(1, 3, SIZE, SIZE),), input_names=["image"],
                dynamic_shapes=shapes,
            )  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
    program.save(str(path))
    return str(path)


def test_one_heads_attention_from_the_default_exporter(tmp_path) -> None:
    # (review) a single head merged into the batch axis is an axis of 1: it was read as no
    # merge, and its split back out as a reshape across the tokens
    model = vit(pos=False)
    for block in model.blocks:
        block.attn.heads = 1
    path = export_dynamo(model, tmp_path / "vit.onnx", dynamic=False)
    result = eqaudit.audit(path, "d4", input_size=SIZE, num_images=2, seed=0)
    rows = [r for r in result.layers if r["kind"] == "spatial" and r["transform"] != "id"]
    assert len({r["layer"] for r in rows}) >= 35 and all(r["scored"] for r in rows)
    assert max(r["relative_error_max"] for r in rows) < 1e-5


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed batch", "dynamic size"])
def test_a_vit_from_the_default_exporter_gives_the_modules_numbers(tmp_path, dynamic) -> None:  # type: ignore[no-untyped-def]
    # The dynamo exporter writes an attention's keys as Reshape (B, heads, N, d) -> (B * heads,
    # N, d), Transpose, Reshape back: "reshapes a token sequence across its token axis", and
    # every layer after the first attention was unknown (7 of ~40 audited). The heads merged
    # into the batch axis are followed (not compared); its batch-1 graph runs batched.
    import onnx

    from eqaudit.grids import onnx_grid_graph

    for pos in (False, True):
        model = vit(pos=pos)
        path = export_dynamo(model, tmp_path / f"vit{pos}.onnx", dynamic)
        graph = eqaudit.audit(path, "d4", input_size=SIZE, num_images=4, seed=0)
        if not dynamic:
            assert graph.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
        rows = [r for r in graph.layers if r["kind"] == "spatial" and r["transform"] != "id"]
        assert len({r["layer"] for r in rows}) >= 35 and all(r["scored"] for r in rows)
        if not pos:
            assert max(r["relative_error_max"] for r in rows) < 1e-5
            continue
        # the last layer norm's tensor (read by the class token's Gather) is the module's norm
        onnx_graph = onnx.load(path).graph
        gather = next(n for n in onnx_graph.node if n.op_type == "Gather" and n.input[0] in {
            r["layer"] for r in rows})  # fmt: skip
        module = eqaudit.audit(model, "d4", input_size=SIZE, num_images=4, seed=0)
        for element in ("rot90", "flip_h", "transpose"):
            g, m = graph.layer(gather.input[0], element), module.layer("norm", element)
            assert g["relative_error"] == pytest.approx(m["relative_error"], rel=1e-4)
        walk = onnx_grid_graph(onnx.load(path), "image", "NCHW")
        merged = [
            name
            for name in walk.names
            if "holds its heads" in (walk.unknown_reason(name, SIZE, SIZE) or "")
        ]
        assert len(merged) == 4  # (two blocks: the keys merged, transposed)
        assert not set(merged) & set(walk.token_layouts(SIZE, SIZE))


class RegisterViT(ViT):
    """DINOv2's registers: inserted between the class token and the patches by slicing the
    class token off, ``cat(x[:, :1], registers, x[:, 1:])``."""

    def __init__(self) -> None:
        super().__init__(pos=False)
        self.registers = nn.Parameter(torch.randn(1, 4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        registers = self.registers.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_registers_inserted_after_the_class_token_are_prefix_tokens(tmp_path) -> None:
    # (sweep) "slices the token axis": a DINOv2's audit was its patch embedding alone, in a
    # module as in its ONNX export
    torch.manual_seed(0)
    model = d4_symmetrise_(RegisterViT()).eval()
    graph, reason = export_grid_graph(model, torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None, reason
    assert graph.token_layouts(SIZE, SIZE)["blocks.1"] == TokenLayout(0, 1, 5, 4, 4)
    path = export_vit(model, tmp_path / "registers.onnx", "dynamic size")
    for target in (model, path):
        result = eqaudit.audit(target, "d4", input_size=SIZE, num_images=3, seed=0)
        rows = [r for r in result.layers if r["kind"] == "spatial" and r["transform"] != "id"]
        assert len({r["layer"] for r in rows}) >= (18 if target is model else 50)
        assert all(r["scored"] for r in rows)
        assert max(r["relative_error_max"] for r in rows) < 1e-5
        note = next(n for n in result.summary["geometry"]["notes"] if "token sequences" in n)
        assert note.endswith(
            "the 5 tokens in front of the patches (a class token, register tokens) are left out"
        )


class NormedStage(nn.Module):
    """A pyramid transformer's stage end without a linear layer: patch tokens, a layer norm,
    folded back into their map, a strided conv (PVT's patch embedding of the next stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.down = nn.Conv2d(8, 8, 2, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.embed(x)
        b, c, h, w = m.shape
        t = self.norm(m.flatten(2).transpose(1, 2))
        return self.head(self.down(t.transpose(1, 2).reshape(b, c, h, w)).mean((2, 3)))


@pytest.mark.parametrize("how", ["fixed batch", "dynamic size"])
def test_an_onnx_sequence_folded_back_into_its_map(tmp_path, how) -> None:  # type: ignore[no-untyped-def]
    # (sweep) shape inference left the sequence's channel count unknown after the exporter's
    # flatten (a Reshape to a target computed from Shape): the fold back read as "across the
    # token axis", and every map after it was unknown
    import onnx

    from eqaudit.grids import onnx_grid_graph

    path = export_vit(NormedStage().eval(), tmp_path / "stage.onnx", how, size=16)
    graph = onnx_grid_graph(onnx.load(path), "image", "NCHW")
    grids = graph.grids(16, 16)
    assert grids["/norm/LayerNormalization_output_0"].h == AxisGrid(4, 4.0, 1.5, (0, 3))
    assert grids["/down/Conv_output_0"].h == AxisGrid(2, 8.0, 3.5, (0, 1))


class EinsumAttention(Attention):
    """Attention written with einsum (``bhid,bhjd->bhij``, ``bhij,bhjd->bhid``), its output
    projection too; or a Mixer's token mixing (``bnd,nm->bmd``: tokens against a constant)."""

    def __init__(self, dim: int, mixing: bool = False) -> None:
        super().__init__(dim)
        self.mixing = mixing
        self.tokens = nn.Parameter(torch.randn(17, 17))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = torch.einsum("bhid,bhjd->bhij", q * (c // self.heads) ** -0.5, k).softmax(-1)
        x = torch.einsum("bhij,bhjd->bhid", scores, v).transpose(1, 2).reshape(b, n, c)
        if self.mixing:
            x = torch.einsum("bnd,nm->bmd", x, self.tokens)
        return torch.einsum("bnd,ed->bne", x, self.proj.weight) + self.proj.bias


@pytest.mark.parametrize("target", ["module", "onnx"])
def test_attention_written_with_einsum(tmp_path, target) -> None:  # type: ignore[no-untyped-def]
    # (review) "aten::einsum is not understood on a token sequence": everything after an
    # einsum attention was unknown, in modules and ONNX graphs (an Einsum node) alike
    for pos in (False, True):
        model = vit(pos=pos)
        for block in model.blocks:
            block.attn = EinsumAttention(16)
        torch.manual_seed(1)
        model = d4_symmetrise_(model).eval() if not pos else model.eval()
        path = export_vit(model, tmp_path / f"ein{pos}.onnx", "dynamic size")
        result = eqaudit.audit(
            model if target == "module" else path, "d4", input_size=SIZE, num_images=3, seed=0
        )
        rows = [r for r in result.layers if r["kind"] == "spatial" and r["transform"] != "id"]
        assert all(r["scored"] for r in rows)
        if target == "module":
            assert {"blocks.0.attn", "blocks.1"} <= {r["layer"] for r in rows}
        else:
            assert len({r["layer"] for r in rows}) >= 40
        if not pos:
            assert max(r["relative_error_max"] for r in rows) < 1e-5
        elif target == "onnx":  # the last layer norm's numbers are the module's
            module = eqaudit.audit(model, "d4", input_size=SIZE, num_images=3, seed=0)
            tensor = onnx_tensor(result, "/norm/")
            for element in ("rot90", "flip_h"):
                got, want = result.layer(tensor, element), module.layer("norm", element)
                assert got["relative_error"] == pytest.approx(want["relative_error"], rel=1e-4)
    mixer = vit(pos=False)
    mixer.blocks[0].attn = EinsumAttention(16, mixing=True)
    graph, _ = export_grid_graph(mixer.eval(), torch.zeros(1, 3, SIZE, SIZE))
    assert graph is not None and graph.grids(SIZE, SIZE)["blocks.0.attn"] is None
    assert "contracts a sequence's tokens" in graph.unknown_reason("blocks.0.attn", SIZE, SIZE)
