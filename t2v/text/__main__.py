"""``python -m t2v.text embed ...``: see t2v/text/cli.py."""
import sys

from t2v.text.cli import main

if __name__ == "__main__":
    sys.exit(main())
