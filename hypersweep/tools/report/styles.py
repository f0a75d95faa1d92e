"""One line style per method, shared by the interactive page and the PNG figures.

colour = the algorithm (a shade of it per backend: torch lighter than jax), dash = the
method's variant (K setting, t, params, dtype: the rest of its label), marker = the
backend. Colours are fixed per algorithm over the whole report, so a method keeps its
colour from panel to panel; within a panel no two methods share colour and dash (the
pair (algorithm, backend) picks the colour and the variant the dash).
"""
from __future__ import annotations

import colorsys
from collections.abc import Iterable
from dataclasses import dataclass

#: 20 colours far apart in hue and lightness (no greys: the references are grey)
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd",
    "#e6550d", "#31a354", "#756bb1", "#a55194", "#6b6ecf", "#b5cf6b",
)
#: on/off lengths in px (empty: solid); index 0 is the first variant of an algorithm
DASHES: tuple[tuple[float, ...], ...] = (
    (), (7, 3), (2, 2), (8, 3, 2, 3), (14, 4), (14, 4, 2, 4), (4, 4),
    (8, 2, 2, 2, 2, 2), (1, 4), (10, 2, 4, 2),
)
#: Plotly marker symbol and matplotlib marker per backend
MARKERS = {"jax": ("circle", "o"), "torch": ("square", "s"), "numpy": ("diamond", "D")}
_OTHER_MARKERS = (("triangle-up", "^"), ("x", "x"), ("star", "*"), ("cross", "P"))
REFERENCE_COLOR = "#7f7f7f"


@dataclass(frozen=True)
class Style:
    color: str                       # "#rrggbb"
    dash: tuple[float, ...]          # on/off lengths in px; () = solid
    marker: str                      # Plotly symbol
    mpl_marker: str                  # matplotlib marker

    @property
    def plotly_dash(self) -> str:
        return "solid" if not self.dash else ",".join(f"{v:g}px" for v in self.dash)

    def mpl_linestyle(self, linewidth: float = 1.5):
        """A matplotlib linestyle with the same pattern (lengths in line widths)."""
        if not self.dash:
            return "-"
        return (0, tuple(v / linewidth for v in self.dash))


def _dash(i: int) -> tuple[float, ...]:
    if i < len(DASHES):
        return DASHES[i]
    return (3 + i, 2, 1, 2)  # beyond the table: still distinct patterns


def _color(i: int) -> str:
    if i < len(PALETTE):
        return PALETTE[i]
    r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, 0.45, 0.65)  # golden-ratio hues
    return "#{:02x}{:02x}{:02x}".format(int(r * 255), int(g * 255), int(b * 255))


def lighter(color: str, amount: float = 0.45) -> str:
    """``color`` mixed with white (``amount`` 0: unchanged, 1: white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#{:02x}{:02x}{:02x}".format(*mix)


def rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


@dataclass(frozen=True)
class MethodKey:
    """What a method is made of: its label, algorithm, variant (K setting, t, params,
    dtype: the label less the algorithm and backend) and backend."""
    label: str
    algorithm: str
    variant: str
    backend: str


def assign_styles(keys: Iterable[MethodKey], *, algorithms: Iterable[str] = (),
                  backends: Iterable[str] = ()) -> dict[str, Style]:
    """A :class:`Style` per method label. Colours and dashes depend only on the set of
    algorithms, variants and backends, so the same input gives the same styles; pass the
    whole report's ``algorithms`` and ``backends`` so that figures drawing different
    subsets still give an algorithm one colour."""
    keys = sorted(set(keys), key=lambda k: (k.algorithm, k.variant, k.backend, k.label))
    algorithms = sorted({k.algorithm for k in keys} | set(algorithms))
    backends = sorted({k.backend for k in keys} | set(backends))
    variants: dict[str, list[str]] = {}
    for k in keys:
        variants.setdefault(k.algorithm, [])
        if k.variant not in variants[k.algorithm]:
            variants[k.algorithm].append(k.variant)
    styles = {}
    for k in keys:
        base = _color(algorithms.index(k.algorithm))
        shade = backends.index(k.backend) if len(backends) > 1 else 0
        color = base if shade == 0 else lighter(base, min(0.25 * shade + 0.2, 0.7))
        marker = MARKERS.get(k.backend) or _OTHER_MARKERS[
            backends.index(k.backend) % len(_OTHER_MARKERS)]
        styles[k.label] = Style(color=color, dash=_dash(variants[k.algorithm].index(
            k.variant)), marker=marker[0], mpl_marker=marker[1])
    return styles


def split_label(label: str, algorithm: str, backend: str | None) -> MethodKey:
    """The :class:`MethodKey` of a report label such as ``aid_cg K=10 [torch]``."""
    variant = label[len(algorithm):] if label.startswith(algorithm) else label
    if backend:
        variant = variant.replace(f" [{backend}]", "")
    return MethodKey(label=label, algorithm=algorithm, variant=variant.strip(),
                     backend=backend or "")


def error_line_styles(curves, results=None) -> dict[str, Style]:
    """The style of each hypergradient-error line (``curves``: :func:`~.statistics.
    error_curves`, by ``line``), for the page and the PNG alike. A label names its backend
    only when the outputs hold several; the marker says it always. ``results``: the whole
    report's rows, so that colours follow every algorithm the report shows."""
    keys = []
    for line, algo, backend in curves[["line", "algorithm", "backend"]].drop_duplicates(
            ).itertuples(index=False):
        key = split_label(line, algo, backend if f"[{backend}]" in line else None)
        keys.append(MethodKey(key.label, key.algorithm, key.variant, backend))
    return assign_styles(keys, **report_palette(results))


def report_palette(results) -> dict:
    """:func:`assign_styles`' ``algorithms`` and ``backends`` from the whole report's rows
    (``results``; None or empty: none), so that an algorithm has one colour in every
    figure."""
    if results is None or results.empty:
        return {}
    return dict(algorithms=sorted(results["algorithm"].dropna().astype(str).unique()),
                backends=sorted(results["backend"].dropna().astype(str).unique()))


def method_styles(frame, results, methods=None) -> dict[str, Style]:
    """The style of each hpo / black-box method, for the page and the PNGs alike: ``frame``
    (:func:`~.statistics.method_frame` of ``results``) gives a method's algorithm and
    backend; ``methods`` (default: every method of ``frame``) are the labels to style, one
    that ``frame`` lacks styled as an algorithm of its own."""
    first = frame.drop_duplicates("method").set_index("method")
    names = list(first.index) if methods is None else list(methods)
    keys = [split_label(m, str(first.loc[m, "algorithm"]), str(first.loc[m, "backend"]))
            for m in names if m in first.index]
    keys += [MethodKey(m, m, "", "") for m in names if m not in first.index]
    return assign_styles(keys, **report_palette(results))
