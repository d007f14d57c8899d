"""Kill `dinospec train` at random moments, resume it, and check that the finished run is bitwise the run that was
never interrupted (the machinery lives with the tests, in tests/resume_harness.py, whose docstring says more).

    .venv/bin/python scripts/torture_resume.py --trials 10 [--seed S] [--ranks 1|2] [--async-save]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from resume_harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
