"""The simulator's claims checked against the real thing: `crisp bench` replays the
live-spike scenario against a real `crisp up` federation and runs the simulator on the
same trace; the two must agree within the tolerances below.
"""

import json
import os
import subprocess

from test_openai_sdk import CRISP, ROOT, federation  # noqa: F401  (the fixture)

SCENARIO = os.path.join(ROOT, "scenarios", "live-spike.toml")

# How close the simulator must come to the live run (absolute points for shares, and
# relative-plus-absolute slack for latencies, which the machine's own load disturbs).
SHARE_POINTS = {"served": 3.0, "capacity_errors": 3.0, "cross_region": 8.0}
LATENCY = {
    "ttft_p50_ms": (0.25, 25.0),
    "ttft_p95_ms": (0.40, 60.0),
    "e2e_p50_ms": (0.15, 40.0),
    "e2e_p95_ms": (0.25, 100.0),
}


def test_simulator_predicts_the_live_fleet(federation):  # noqa: F811
    out = subprocess.run(
        [CRISP, "bench", SCENARIO, "--port", str(federation["base"]), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    measured, simulated = result["measured"], result["simulated"]
    assert result["offered"] == result["simulated_offered"]
    assert result["other_errors"] == {}, result["other_errors"]
    print(json.dumps(result, indent=1))
    # The spike must push work across regions, or the comparison proves little.
    assert measured["cross_region"] > 20.0, measured
    for key, points in SHARE_POINTS.items():
        assert abs(measured[key] - simulated[key]) <= points, (key, measured, simulated)
    for key, (rel, slack) in LATENCY.items():
        m, s = measured[key], simulated[key]
        assert abs(m - s) <= rel * s + slack, (key, m, s)
