"""Where tests find the repository and the offline text corpora."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
C4 = str(CORPORA / "en_web_c4_owt.txt")
