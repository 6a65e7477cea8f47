import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_report_header(config):
    from tests.faults.modes import choose

    mode, why = choose()
    return f"fault injection (tests/faults): {mode} ({why})"
