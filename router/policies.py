"""Width policies by name: ``make_policy("kind[:arg]", widths, context)`` and the registry behind it.

The registry sits above the policies it builds (:mod:`router.policy` for ``fixed``,
:mod:`router.slo` for ``slo``), so no policy module imports another to register itself.
A new kind registers a factory with :func:`register_policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.policy import FixedPolicy, PolicyContext, WidthPolicy
from router.slo import SloPolicy

PolicyFactory = Callable[[str, Sequence[str], PolicyContext], WidthPolicy]
"""``factory(argument, width_names, context) -> policy``; ``argument`` follows ``kind:`` in the spec."""

_FACTORIES: dict[str, PolicyFactory] = {}


def register_policy(kind: str, factory: PolicyFactory) -> None:
    """Make ``make_policy("<kind>:<arg>")`` build policies with ``factory``."""
    _FACTORIES[kind] = factory


def make_policy(spec: str | None, widths: Sequence[str], context: PolicyContext | None = None) -> WidthPolicy:
    """Build a policy from ``"kind[:arg]"``, e.g. ``"fixed:s"`` or ``"slo"``; ``None`` is the widest fixed width.

    ``widths`` are the served width names, narrowest first; a policy must only ever answer one of them.
    """
    if not widths:
        raise ValueError("make_policy needs at least one width name")
    if spec is None:
        return FixedPolicy(widths[-1])
    kind, _, argument = spec.partition(":")
    if kind not in _FACTORIES:
        raise ValueError(f"unknown policy {spec!r}; known kinds: {sorted(_FACTORIES)} (spec is 'kind:arg')")
    return _FACTORIES[kind](argument, list(widths), context or PolicyContext())


def needs_predictor(spec: str | None) -> bool:
    """Whether a policy spec needs a latency predictor (a cost model) to be built."""
    return spec is not None and spec.partition(":")[0] in _NEEDS_PREDICTOR


def _fixed(argument: str, widths: Sequence[str], context: PolicyContext) -> WidthPolicy:
    width = argument or widths[-1]
    if width not in widths:
        raise ValueError(f"fixed policy: unknown width {width!r}; known: {list(widths)}")
    return FixedPolicy(width)


def parse_options(argument: str) -> dict[str, str]:
    """``"min_width=m,shed=true"`` -> {"min_width": "m", "shed": "true"}."""
    options = {}
    for part in filter(None, (p.strip() for p in argument.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"slo policy option {part!r} is not key=value")
        options[key.strip()] = value.strip()
    return options


def _truthy(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _slo(argument: str, widths: Sequence[str], context: PolicyContext) -> SloPolicy:
    if context.predictor is None and not context.dispatch:
        raise ValueError("the slo policy needs a latency predictor (a latency profile); none was given")
    options = parse_options(argument)
    known = {"slo_ms", "min_width", "shed", "headroom", "dwell_s", "utilization", "rate_window_s", "width_changes"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"slo policy: unknown option(s) {unknown}; known: {sorted(known)}")
    try:
        return SloPolicy(
            widths, context.predictor,
            default_slo_ms=float(options["slo_ms"]) if "slo_ms" in options else context.default_slo_ms,
            min_width=options.get("min_width", context.min_width),
            shed=_truthy(options["shed"]) if "shed" in options else context.shed,
            headroom=float(options.get("headroom", 0.2)),
            dwell_s=float(options.get("dwell_s", 1.0)),
            utilization=float(options.get("utilization", 0.9)),
            rate_window_s=float(options.get("rate_window_s", 2.0)),
            dispatch=context.dispatch,
            width_changes=_truthy(options.get("width_changes", "on")),
        )
    except ValueError as exc:
        raise ValueError(f"policy 'slo:{argument}': {exc}") from exc


register_policy("fixed", _fixed)
register_policy("slo", _slo)
_NEEDS_PREDICTOR = {"slo"}
