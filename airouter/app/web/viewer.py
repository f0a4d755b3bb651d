"""The OHIF viewer at ``/viewer``, on the node's own DICOMweb, behind the node's login.

The prebuilt viewer comes from the npm package ``@ohif/app`` (pinned: :data:`OHIF_VERSION`),
installed by the Makefile into an ignored folder (:data:`VIEWER_DIR`) with
``python -m airouter.app.web.viewer install <package.tgz>``. It is built for the root path:
the install rewrites its absolute links (``index.html``, webpack's public path in every
bundle, the stylesheets' fonts) to live under ``/viewer/`` and leaves its service worker out.
Its settings (``app-config.js``) are written by the node when asked: one DICOMweb data source,
the node itself, at whatever address the browser reached it by.
"""

from __future__ import annotations

import argparse
import mimetypes
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

OHIF_VERSION = "3.13.2"
PREFIX = "/viewer/"
VIEWER_DIR = Path(__file__).parent / "static" / "vendor" / "ohif"
_STAMP = f".installed-{OHIF_VERSION}"  # the Makefile's target: a new version reinstalls

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")

APP_CONFIG = """/* Written by airouter: the node's own DICOMweb, as the browser reached the node. */
(function () {
  var root = window.location.origin + "/dicomweb";
  window.config = {
    routerBasename: "/viewer",
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    investigationalUseDialog: { option: "never" },
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: "always",
    defaultDataSourceName: "airouter",
    dataSources: [
      {
        namespace: "@ohif/extension-default.dataSourcesModule.dicomweb",
        sourceName: "airouter",
        configuration: {
          friendlyName: "airouter archive",
          name: "airouter",
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: true,
          imageRendering: "wadors",
          thumbnailRendering: "wadors",
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: "bulkdata",
          bulkDataURI: { enabled: true },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
"""


# OHIF 3.13.2 reads the image reference of every measurement of an SR, and one without an
# image region (a TID 1411 volumetric group that references a SEG segment, a TID 1501 group
# saying a structure is Absent) makes it throw and show nothing of the study. The guard makes
# it skip those (they stay in the SR; the measurement panel lists the structures drawn).
_FIXES = (
    (
        "const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;",
        "const referencedSOPSequence = measurement.coords[0]?.ReferencedSOPSequence;",
    ),
)


def rewrite(dist: Path, prefix: str = PREFIX) -> int:
    """Move a root-path OHIF build under ``prefix``; returns how many files changed."""
    changed = 0
    index = dist / "index.html"
    text = index.read_text()
    text = text.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')
    text = re.sub(r'<script[^>]*src="/init-service-worker\.js"[^>]*></script>', "", text)
    text = re.sub(r'(href|src)="/(?!/)', rf'\1="{prefix}', text)
    index.write_text(text)
    changed += 1
    for path in dist.rglob("*.js"):
        js = path.read_text(errors="surrogateescape")
        new = js.replace('__webpack_require__.p = "/";', f'__webpack_require__.p = "{prefix}";')
        for old, fixed in _FIXES:
            new = new.replace(old, fixed)
        if new != js:
            path.write_text(new, errors="surrogateescape")
            changed += 1
    for path in dist.rglob("*.css"):
        css = path.read_text(errors="surrogateescape")
        new = re.sub(r"url\(/(?!/)", f"url({prefix}", css)
        if new != css:
            path.write_text(new, errors="surrogateescape")
            changed += 1
    for path in dist.glob("*.json"):  # the web app manifests' icons
        manifest = path.read_text()
        new = manifest.replace('"/assets/', f'"{prefix}assets/')
        if new != manifest:
            path.write_text(new)
            changed += 1
    for name in ("sw.js", "init-service-worker.js"):  # no service worker under the node
        (dist / name).unlink(missing_ok=True)
    return changed


def install(package: Path, dest: Path = VIEWER_DIR, prefix: str = PREFIX) -> Path:
    """Unpack ``@ohif/app``'s ``dist/`` from its npm tarball into ``dest``, rewritten for
    ``prefix``; replaces what was there only once the new one is complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(package) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(tmp, members=members, filter="data")
        dist = Path(tmp) / "package" / "dist"
        if not (dist / "index.html").is_file():
            raise SystemExit(f"{package}: no dist/index.html (not the @ohif/app package?)")
        rewrite(dist, prefix)
        (dist / _STAMP).write_text(f"{OHIF_VERSION}\n")
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            dest.rename(old)
        dist.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def viewer_router(dist: Path = VIEWER_DIR) -> APIRouter:
    """``/viewer``: the viewer's files, its settings, and its page for every route of it."""
    app = APIRouter(include_in_schema=False)
    root = dist.resolve()

    @app.get("/viewer")
    def viewer_root() -> Response:
        return RedirectResponse(PREFIX, 308)

    @app.get("/viewer/app-config.js")
    def app_config() -> Response:
        return Response(
            APP_CONFIG, media_type="text/javascript", headers={"Cache-Control": "no-store"}
        )

    @app.get("/viewer/{path:path}")
    def viewer_file(path: str) -> Response:
        if not (root / _STAMP).is_file():
            raise HTTPException(
                404,
                f"the viewer is not installed (make install puts OHIF {OHIF_VERSION} in {dist})",
            )
        target = (root / path).resolve()
        if path and target.is_relative_to(root) and target.is_file():
            hashed = re.search(r"\.[0-9a-f]{16,}\.|^[0-9a-f]{16}\.", target.name) is not None
            cache = "public, max-age=31536000, immutable" if hashed else "no-cache"
            return FileResponse(target, headers={"Cache-Control": cache})
        if "." in path.rsplit("/", 1)[-1]:  # a file it does not have
            raise HTTPException(404, f"no such file of the viewer: {path[:100]}")
        # a route of the single-page application (/viewer/viewer?StudyInstanceUIDs=...)
        return HTMLResponse(
            (root / "index.html").read_text(), headers={"Cache-Control": "no-cache"}
        )

    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m airouter.app.web.viewer install PACKAGE.tgz [--dest DIR]``."""
    parser = argparse.ArgumentParser(prog="airouter.app.web.viewer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="unpack and rewrite the @ohif/app npm tarball")
    cmd.add_argument("package", type=Path)
    cmd.add_argument("--dest", type=Path, default=VIEWER_DIR)
    args = parser.parse_args(argv)
    where = install(args.package, args.dest)
    print(f"OHIF {OHIF_VERSION} installed in {where} for {PREFIX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
