"""Where the tests find the real data: ``../shared/data`` beside the checkout, or $LSTMCAP_DATA.

Tests that need it skip, with a reason naming this folder, when it is absent.
"""

import os
from pathlib import Path

DATA = Path(
    os.environ.get("LSTMCAP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
