"""Write flows/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

DVC's default page loads the three libraries from cdn.jsdelivr.net (dvc_render's
``VegaRenderer.SCRIPTS``): offline, `dvc plots show/diff` writes a blank page. A template without
the ``{scripts}`` placeholder gets no CDN tags; this one carries the same versions (read from
dvc_render's pins) as inline scripts, taken from the npm packages' UMD builds.

    python flows/plots/build_template.py           # `npm pack`s the pinned versions (needs npm)
    python flows/plots/build_template.py --from DIR   # DIR/<name>-<version>.tgz already there
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "offline.html"
LICENSES = HERE / "LICENSES.txt"

# DVC's PAGE_HTML (dvc_render/html.py) with inline scripts where it has {scripts}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <meta charset="utf-8">
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def pinned_versions() -> list[tuple[str, str]]:
    """(package, version) of each script DVC's vega page loads from the CDN, in load order."""
    from dvc_render.vega import VegaRenderer

    return re.findall(r'src="https://cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)"', VegaRenderer.SCRIPTS)


def build(packs: Path) -> None:
    scripts, licenses = [], []
    for name, version in pinned_versions():
        tgz = packs / f"{name}-{version}.tgz"
        if not tgz.is_file():
            subprocess.run(["npm", "pack", "-q", f"{name}@{version}"], cwd=packs, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(tgz) as tar:
            js = tar.extractfile(f"package/build/{name}.min.js").read().decode()  # what jsdelivr serves
            licence = tar.extractfile("package/LICENSE").read().decode()
        # inline, a script ends at the first "</script": none may be inside, nor DVC's placeholders
        bad = [s for s in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}") if s in js]
        if bad:
            raise SystemExit(f"{name}@{version} contains {bad}: cannot inline it")
        scripts.append(f"    <!-- {name}@{version} (npm), BSD-3-Clause: see flows/plots/LICENSES.txt -->\n"
                       f"    <script>{js}</script>")
        licenses.append(f"{name}@{version}\n\n{licence.strip()}\n")
    TEMPLATE.write_text(PAGE.format(scripts="\n".join(scripts)), encoding="utf8")
    LICENSES.write_text("The scripts inlined in offline.html:\n\n" + "\n\n".join(licenses), encoding="utf8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="packs", type=Path, help="a folder holding the npm tarballs")
    args = ap.parse_args()
    if args.packs:
        build(args.packs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
