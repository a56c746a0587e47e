"""gpubatch's on/off environment switches: escape hatches for a behaviour that is on by default,
each also the other contestant of the benchmark that measures that behaviour.

Workers read them (they inherit the client's environment, or Dask's pre-spawn one), so a value
that is neither 0 nor 1 is refused before a run starts (``runtime.preflight.check_environment``)
rather than read as one or the other on some workers.
"""

from __future__ import annotations

import os

from gpubatch.core.errors import SpecError

#: ``GPUBATCH_PLAN_AHEAD=0`` opens slides ahead without planning their reads (a plan holds up to
#: the read-ahead floor, 8 MB, of tiles fetched before its shard starts); bench_remote --plan-ahead
PLAN_AHEAD = "GPUBATCH_PLAN_AHEAD"
#: ``GPUBATCH_JOIN_READS=0`` fetches each planned read ahead on its own, its neighbouring pieces
#: of the same rows of stored tiles in requests of their own; bench_remote --join-reads
JOIN_READS = "GPUBATCH_JOIN_READS"

#: what 0 does, for the refusal's message
OFF_MEANS = {
    PLAN_AHEAD: "0 opens slides ahead of their shards without planning their reads; unset plans them",
    JOIN_READS: "0 fetches each planned read on its own; unset joins neighbouring reads' requests",
}


def switched_on(name: str) -> bool:
    """The switch ``name`` unset or 1: on; 0: off; anything else is refused."""
    value = os.environ.get(name, "1").strip()
    if value not in ("0", "1"):
        raise SpecError([(name, f"must be 0 or 1, not {value!r} ({OFF_MEANS[name]})")])
    return value == "1"


def check_switches() -> None:
    """Refuse any malformed switch (what the workers would otherwise each read)."""
    for name in OFF_MEANS:
        switched_on(name)
