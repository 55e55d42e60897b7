"""The README's screenshot of ``bnlab explain``'s page (docs/explain.png), taken in Debian's
headless Chromium at 1280x800, with the page built from the committed Figure 1 run.

    .venv/bin/python tools/explain_screenshot.py [--out docs/explain.png]
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "explain.png"))
    args = p.parse_args(argv)
    from bnlab import explain
    from bnlab.explain import browser

    with tempfile.TemporaryDirectory() as tmp:
        page = explain.build(Path(tmp) / "page", run=ROOT / "docs" / "results" / "fig1")
        driver = browser.chromium(Path(tmp) / "profile")
        try:
            driver.get(page.as_uri())
            assert driver.execute_script("return document.body.dataset.ready") == "true"
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
