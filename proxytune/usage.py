"""What this process has used so far, for reports (demo, training)."""
from __future__ import annotations

import resource


def peak_rss_gb() -> float:
    """The largest resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
