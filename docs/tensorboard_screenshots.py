"""Screenshots of TensorBoard's tabs in headless Chromium, as in the README.

Starts TensorBoard on LOGDIR (this interpreter's ``tensorboard.main``), puts a same-origin
proxy in front of it that first sets TensorBoard's UI settings in the page's local storage
(smoothing 0, outliers not ignored: the README's recommendation), then shoots each tab.
Needs Debian's ``chromium`` (``apt-get install -y chromium fonts-dejavu-core``)::

    python docs/tensorboard_screenshots.py runs/tensorboard_views/<run>/tensorboard docs/images
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TABS = {"timeseries": "timeseries", "scalars": "scalars&_smoothingWeight=0", "images": "images",
        "custom_scalars": "custom_scalars&_smoothingWeight=0", "text": "text"}
SETTINGS_PAGE = b"""<html><body><script>
localStorage.setItem('_ignoreYOutliers', 'false');
localStorage.setItem('_tb_global_settings.timeseries', JSON.stringify({scalarSmoothing: 0, ignoreOutliers: false}));
localStorage.setItem('_tb_global_settings', JSON.stringify({scalarSmoothing: 0, ignoreOutliers: false}));
location.replace('/' + decodeURIComponent(location.search.slice(6)));
</script></body></html>"""


def _proxy(upstream: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _relay(self, data=None) -> None:
            req = urllib.request.Request(upstream + self.path, data=data,
                                         headers={"Content-Type": self.headers.get("Content-Type", "")})
            try:
                r = urllib.request.urlopen(req, timeout=30)
                code, body, headers = r.status, r.read(), r.headers
            except urllib.error.HTTPError as err:
                code, body, headers = err.code, err.read(), err.headers
            self.send_response(code)
            for k in ("Content-Type", "Content-Encoding"):
                if headers.get(k):
                    self.send_header(k, headers[k])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/set.html"):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(SETTINGS_PAGE)
            else:
                self._relay()

        def do_POST(self) -> None:
            self._relay(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir")
    p.add_argument("out", help="folder for tensorboard_<tab>.png")
    p.add_argument("--port", type=int, default=6177, help="TensorBoard's port (the proxy uses the next one)")
    p.add_argument("--tabs", nargs="+", default=list(TABS), choices=list(TABS))
    p.add_argument("--budget-ms", type=int, default=25000, help="Chromium's --virtual-time-budget")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1",
                           "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = _proxy(f"http://127.0.0.1:{args.port}", args.port + 1)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/data/plugins_listing", timeout=2)
                break
            except OSError:
                time.sleep(1)
        time.sleep(3)
        for tab in args.tabs:
            target = out / f"tensorboard_{tab}.png"
            url = f"http://127.0.0.1:{args.port + 1}/set.html?next=" + urllib.request.quote("#" + TABS[tab])
            subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1600,1200", f"--virtual-time-budget={args.budget_ms}",
                            f"--screenshot={target}", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120, check=True)
            print(target)
    finally:
        server.shutdown()
        tb.terminate()
        tb.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
