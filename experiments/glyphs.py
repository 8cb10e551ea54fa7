"""CJK glyphs drawn by the fonts of Debian packages: a character is an identity, a font is
one "photo" of it.

Each font's character map (fontTools) says which code points it claims; a claimed glyph can
still be a placeholder, so renders that are blank, equal to the font's .notdef box, or
repeated for several characters of one font are dropped, and so is a render identical to
another font's render of the same character (the proportional/monospace twins of a family).
Only code points below U+8000 are used: U+8000 and up are reserved for held-out checks.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Code points used: CJK Unified Ideographs from U+4E00 up to (not including) this limit.
FIRST_CODE_POINT = 0x4E00
RESERVED_FROM = 0x8000

APT_LINE = ("apt-get update && apt-get install -y --no-install-recommends "
            "fonts-arphic-ukai fonts-arphic-uming fonts-wqy-zenhei fonts-wqy-microhei "
            "fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-takao-gothic fonts-vlgothic "
            "fonts-komatuna fonts-droid-fallback fonts-cwtex-kai fonts-cwtex-ming "
            "fonts-cwtex-heib fonts-cwtex-fs fonts-cwtex-yen fonts-hanazono fonts-seto "
            "fonts-kouzan-mouhitsu fonts-aoyagi-soseki")


@dataclass(frozen=True)
class FontSpec:
    package: str  # the Debian package that ships the file
    path: str
    index: int = 0  # face index inside a .ttc collection

    @property
    def name(self) -> str:
        return f"{Path(self.path).stem}#{self.index}"


_D = "/usr/share/fonts"
# One face per distinct design (twins such as TakaoGothic/TakaoPGothic would only add
# duplicate renders; HanaMinB holds no BMP ideographs).
FONTS: tuple[FontSpec, ...] = (
    FontSpec("fonts-arphic-ukai", f"{_D}/truetype/arphic/ukai.ttc"),
    FontSpec("fonts-arphic-uming", f"{_D}/truetype/arphic/uming.ttc"),
    FontSpec("fonts-wqy-zenhei", f"{_D}/truetype/wqy/wqy-zenhei.ttc"),
    FontSpec("fonts-wqy-microhei", f"{_D}/truetype/wqy/wqy-microhei.ttc"),
    FontSpec("fonts-ipaexfont-gothic", f"{_D}/opentype/ipaexfont-gothic/ipaexg.ttf"),
    FontSpec("fonts-ipaexfont-mincho", f"{_D}/opentype/ipaexfont-mincho/ipaexm.ttf"),
    FontSpec("fonts-takao-gothic", f"{_D}/truetype/takao-gothic/TakaoPGothic.ttf"),
    FontSpec("fonts-vlgothic", f"{_D}/truetype/vlgothic/VL-Gothic-Regular.ttf"),
    FontSpec("fonts-komatuna", f"{_D}/truetype/komatuna/komatuna.ttf"),
    FontSpec("fonts-droid-fallback", f"{_D}/truetype/droid/DroidSansFallbackFull.ttf"),
    FontSpec("fonts-cwtex-kai", f"{_D}/truetype/cwtex/cwkai.ttf"),
    FontSpec("fonts-cwtex-ming", f"{_D}/truetype/cwtex/cwming.ttf"),
    FontSpec("fonts-cwtex-heib", f"{_D}/truetype/cwtex/cwheib.ttf"),
    FontSpec("fonts-cwtex-fs", f"{_D}/truetype/cwtex/cwfs.ttf"),
    FontSpec("fonts-cwtex-yen", f"{_D}/truetype/cwtex/cwyen.ttf"),
    FontSpec("fonts-hanazono", f"{_D}/truetype/hanazono/HanaMinA.ttf"),
    FontSpec("fonts-seto", f"{_D}/truetype/seto/setofont.ttf"),
    FontSpec("fonts-seto", f"{_D}/truetype/seto/setofont-ex.ttf"),
    FontSpec("fonts-kouzan-mouhitsu", f"{_D}/truetype/kouzan-mouhitsu/kouzan-mouhitsu.ttf"),
    FontSpec("fonts-kouzan-mouhitsu",
             f"{_D}/truetype/kouzan-mouhitsu/kouzan-mouhitsu-gyosho.ttf"),
    FontSpec("fonts-kouzan-mouhitsu",
             f"{_D}/truetype/kouzan-mouhitsu/KouzanBrushFontSousyo.ttf"),
    FontSpec("fonts-aoyagi-soseki", f"{_D}/truetype/aoyagi-soseki/aoyagi-soseki.ttf"),
)


# The print designs (Ming/Mincho serif, Hei/Gothic sans): experiment E2 labels characters
# only in these and sees the other designs (Kai, Fangsong, brush, handwriting) only in
# unlabeled tracks.
PRINT_FONTS = frozenset({
    "uming#0", "wqy-zenhei#0", "wqy-microhei#0", "ipaexg#0", "ipaexm#0", "TakaoPGothic#0",
    "VL-Gothic-Regular#0", "komatuna#0", "DroidSansFallbackFull#0", "cwming#0", "cwheib#0",
    "HanaMinA#0",
})


class MissingFontsError(RuntimeError):
    """Too few of the fonts are installed."""


def available_fonts(fonts: tuple[FontSpec, ...] = FONTS) -> list[FontSpec]:
    return [f for f in fonts if os.path.exists(f.path)]


def require_fonts(min_fonts: int, fonts: tuple[FontSpec, ...] = FONTS) -> list[FontSpec]:
    """The installed fonts; raise naming the missing packages if fewer than `min_fonts`."""
    have = available_fonts(fonts)
    if len(have) >= min_fonts:
        return have
    missing = sorted({f.package for f in fonts if not os.path.exists(f.path)})
    raise MissingFontsError(
        f"only {len(have)} of the {len(fonts)} CJK fonts are installed, {min_fonts} needed. "
        f"Missing Debian packages: {' '.join(missing)}\nInstall them with:\n  {APT_LINE}")


def claimed_code_points(font: FontSpec) -> set[int]:
    """Ideographs U+4E00..U+7FFF the font's cmap maps to a glyph of its own.

    A glyph that the cmap gives to 8 or more of these code points is a placeholder.
    """
    from fontTools.ttLib import TTFont

    tt = TTFont(font.path, fontNumber=font.index, lazy=True)
    cmap = {cp: g for cp, g in tt.getBestCmap().items()
            if FIRST_CODE_POINT <= cp < RESERVED_FROM}
    tt.close()
    shared = Counter(cmap.values())
    return {cp for cp, g in cmap.items() if shared[g] < 8 and g != ".notdef"}


def render(text: str, font, size: int) -> np.ndarray:
    """Draw `text` with a PIL font, crop to its ink, scale to fit (size-4)^2 keeping the
    aspect ratio and center it on a size x size canvas (uint8, ink = 255)."""
    from PIL import Image, ImageDraw

    big = font.size * 2
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).text((font.size // 2, font.size // 2), text, fill=255, font=font)
    box = img.getbbox()
    out = Image.new("L", (size, size), 0)
    if box is None:
        return np.asarray(out)
    glyph = img.crop(box)
    inner = size - 4
    w, h = glyph.size
    k = inner / max(w, h)
    glyph = glyph.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
    out.paste(glyph, ((size - glyph.size[0]) // 2, (size - glyph.size[1]) // 2))
    return np.asarray(out)


@dataclass
class GlyphSet:
    """images (n, size, size) uint8; char_of[i] the code point, font_of[i] the font index."""

    images: np.ndarray
    char_of: np.ndarray
    font_of: np.ndarray
    font_names: list[str]

    def chars(self) -> np.ndarray:
        return np.unique(self.char_of)

    def with_min_fonts(self, min_fonts: int) -> GlyphSet:
        """Only the characters that have at least `min_fonts` renders."""
        cps, counts = np.unique(self.char_of, return_counts=True)
        keep = np.isin(self.char_of, cps[counts >= min_fonts])
        if not keep.any():
            raise MissingFontsError(f"no character has {min_fonts} valid renders in the "
                                    f"{len(self.font_names)} installed fonts; lower the "
                                    f"minimum or install more fonts:\n  {APT_LINE}")
        return GlyphSet(self.images[keep], self.char_of[keep], self.font_of[keep],
                        self.font_names)


def _render_font(font: FontSpec, code_points: list[int], size: int) -> dict[int, np.ndarray]:
    from PIL import ImageFont

    pil = ImageFont.truetype(font.path, size=2 * size, index=font.index)
    notdef = render(chr(0x10FFFD), pil, size)  # a private-use code point no font maps
    out: dict[int, np.ndarray] = {}
    for cp in code_points:
        img = render(chr(cp), pil, size)
        if int((img > 64).sum()) < 4 or np.array_equal(img, notdef):
            continue  # blank, or the placeholder box
        out[cp] = img
    # A render repeated for 3+ characters of one font is a placeholder, not a glyph.
    counts = Counter(v.tobytes() for v in out.values())
    return {cp: v for cp, v in out.items() if counts[v.tobytes()] < 3}


def build_glyphs(fonts: list[FontSpec], *, size: int = 32, min_fonts: int = 12,
                 max_chars: int | None = None, log=print) -> GlyphSet:
    """Render every ideograph below U+8000 claimed by at least `min_fonts` of `fonts`; keep
    the characters that still have `min_fonts` distinct valid renders."""
    claimed = {f.name: claimed_code_points(f) for f in fonts}
    votes = Counter(cp for s in claimed.values() for cp in s)
    cps = sorted(cp for cp, n in votes.items() if n >= min_fonts)
    if max_chars is not None:
        cps = cps[:max_chars]
    assert all(cp < RESERVED_FROM for cp in cps)
    renders: dict[int, list[tuple[int, np.ndarray]]] = {cp: [] for cp in cps}
    for fi, font in enumerate(fonts):
        mine = [cp for cp in cps if cp in claimed[font.name]]
        got = _render_font(font, mine, size)
        log(f"  font {fi + 1}/{len(fonts)} {font.name}: {len(got)}/{len(mine)} glyphs kept")
        for cp, img in got.items():
            renders[cp].append((fi, img))
    images, char_of, font_of = [], [], []
    for cp in cps:
        seen: set[bytes] = set()
        kept = []
        for fi, img in renders[cp]:
            key = img.tobytes()
            if key not in seen:  # identical render by another font: a twin, not a photo
                seen.add(key)
                kept.append((fi, img))
        if len(kept) < min_fonts:
            continue
        for fi, img in kept:
            images.append(img)
            char_of.append(cp)
            font_of.append(fi)
    if not images:
        raise MissingFontsError(f"no character has {min_fonts} valid renders in the "
                                f"{len(fonts)} installed fonts; lower min_fonts or install "
                                f"more fonts:\n  {APT_LINE}")
    return GlyphSet(np.stack(images), np.asarray(char_of, np.int64),
                    np.asarray(font_of, np.int64), [f.name for f in fonts])


def load_glyphs(fonts: list[FontSpec], cache_dir: str | Path, *, size: int = 32,
                min_fonts: int = 12, max_chars: int | None = None, log=print) -> GlyphSet:
    """`build_glyphs`, cached as a plain .npz (no pickles) keyed by the fonts and settings."""
    key = "|".join([f"{f.path}:{f.index}:{os.path.getsize(f.path)}" for f in fonts]
                   + [f"size={size}", f"min={min_fonts}", f"max={max_chars}", "v1"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"cjk-glyphs-{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return GlyphSet(z["images"], z["char_of"], z["font_of"],
                            [str(s) for s in z["font_names"]])
    log(f"rendering glyphs from {len(fonts)} fonts (cached at {path})")
    gs = build_glyphs(fonts, size=size, min_fonts=min_fonts, max_chars=max_chars, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=gs.images, char_of=gs.char_of, font_of=gs.font_of,
                        font_names=np.asarray(gs.font_names))
    os.replace(tmp, path)
    return gs
