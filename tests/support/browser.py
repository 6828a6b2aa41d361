"""The real ComfyUI frontend in a real browser: Debian's Chromium driven by Playwright (tests/browser).

    with FrontendPage.open(server) as page:         # one Chromium, fresh profile, one page on the server
        page.drop_workflow(path)                    # a drop event with the file, as when a user drags it in
        page.graph()                                # what the canvas holds: nodes, widget values, links
        page.select_node("FewStepLoraLoader")       # a click on the node's title bar
        prompt_id = page.press_run()                # the Run button; the prompt id /prompt answered it

Chromium is /usr/bin/chromium (Debian's package; .ci/run installs it), never a Playwright download. The page
may only reach the server: any other request is aborted before it leaves the browser (the frontend asks
api.comfy.org about node packs). Everything the page logs is kept in ``console`` for assertions.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("FEWSTEP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Settings a fresh ComfyUI user gets before the first page load: no template browser over the canvas.
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True}
MISSING_NODES_DIALOG = '.p-dialog[aria-labelledby="global-missing-nodes"]'
MISSING_MODELS_DIALOG = '.p-dialog[aria-labelledby="global-missing-models-warning"]'

# The drop the frontend's document-level handler receives when a file is dragged onto the canvas.
_DROP = """([text, name]) => {
    const data = new DataTransfer();
    data.items.add(new File([text], name, {type: "application/json"}));
    document.querySelector("#graph-canvas").dispatchEvent(
        new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""

# The active graph as the canvas holds it: per node its type, title and the values of the widgets the
# frontend serializes into widgets_values (in that order); links as [id, origin node, origin slot, target node,
# target input's name] (the frontend renumbers input slots: every widget input has a slot too).
_GRAPH = """() => {
    const graph = window.app.graph;
    const nodes = graph.nodes.map((node) => ({
        id: node.id, type: node.type, title: node.title,
        widgets: (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value),
    }));
    const links = [...graph.links.values()].map((l) => [l.id, l.origin_id, l.origin_slot, l.target_id,
        graph.getNodeById(l.target_id)?.inputs?.[l.target_slot]?.name ?? null]);
    return {nodes, links, path: window.app.extensionManager?.workflow?.activeWorkflow?.path ?? null};
}"""

# The page coordinates of a point on a node's title bar (a little right of its collapse dot), or null.
_TITLE_POINT = """(type) => {
    const node = window.app.graph.nodes.find((n) => n.type === type);
    if (!node) return null;
    const [x, y] = window.app.canvas.ds.convertOffsetToCanvas(
        [node.pos[0] + 60, node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2]);
    const box = window.app.canvas.canvas.getBoundingClientRect();
    return {x: box.left + x, y: box.top + y};
}"""


def chromium_missing() -> str | None:
    """Why the browser tier cannot run here (no Chromium, no Playwright), or None."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (requirements-dev.lock pins it)"
    return None


class FrontendPage:
    """One Chromium with a fresh profile and one page on a ComfyServer; reuse it across tests, close it once."""

    def __init__(self, server, timeout_ms: float = 60_000):
        self.server = server
        self.timeout_ms = timeout_ms
        self.console: list[str] = []
        self._playwright = None
        self._context = None
        self._profile = None
        self.page = None

    @classmethod
    def open(cls, server, **kwargs) -> "FrontendPage":
        return cls(server, **kwargs).start()

    def start(self) -> "FrontendPage":
        from playwright.sync_api import sync_playwright

        status, body = self.server._request("POST", "/settings", FIRST_RUN_SETTINGS)
        if status != 200:
            raise RuntimeError(f"POST /settings answered HTTP {status}: {body}")
        self._profile = tempfile.mkdtemp(prefix="fewstep-chromium-")
        self._playwright = sync_playwright().start()
        try:
            self._context = self._playwright.chromium.launch_persistent_context(
                self._profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 900})
            self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
            self.page.set_default_timeout(self.timeout_ms)
            origin = self.server.url
            self.page.route(lambda url: not url.startswith(origin), lambda route: route.abort())
            self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
            self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
            self.page.goto(origin)
            self._wait_until_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_until_ready(self):
        # the app is up once the canvas holds a graph and the Run button is there
        self.page.wait_for_function("() => window.app?.graph && window.app.canvas")
        self.run_button().wait_for(state="visible")

    def reload(self):
        """Reload the page: a fresh app, which forgets e.g. the model folder listings it has read."""
        self.page.reload()
        self._wait_until_ready()

    def close(self):
        for step in (lambda: self._context and self._context.close(), lambda: self._playwright and self._playwright.stop()):
            try:
                step()
            except Exception:
                pass
        self._context = self._playwright = self.page = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> "FrontendPage":
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- what a user does ------------------------------------------------------------------------
    def drop_workflow(self, path: Path, text: str | None = None) -> dict:
        """Drop the file (or `text` under its name) on the canvas; wait until it is the active graph; return graph()."""
        path = Path(path)
        text = path.read_text() if text is None else text
        # count finished loads: the drop handler ends in app.loadGraphData (the instance method, wrapped once)
        self.page.evaluate("""() => {
            if (window.__fewstepLoads === undefined) {
                window.__fewstepLoads = 0;
                const load = window.app.loadGraphData;
                window.app.loadGraphData = async function (...args) {
                    try { return await load.apply(this, args); } finally { window.__fewstepLoads += 1; }
                };
            }
            return window.__fewstepLoads;
        }""")
        before = self.page.evaluate("() => window.__fewstepLoads")
        self.page.evaluate(_DROP, [text, path.name])
        self.page.wait_for_function("(n) => window.__fewstepLoads > n", arg=before)
        # the frontend blocks the page while it loads (a BlockUI mask that fades out); a user waits for it to go,
        # and so do we: a second drop during the fade leaves a mask behind that catches every later click
        self.page.wait_for_function("() => !document.querySelector('.p-blockui-mask')")
        return self.graph()

    def graph(self) -> dict:
        return self.page.evaluate(_GRAPH)

    def node_boxes(self) -> dict:
        """{node id: {"pos", "size", "min"}} of the canvas' nodes: where they are, how big, and the size the frontend
        computes for their content (slots and widgets)."""
        return {int(k): v for k, v in self.page.evaluate("""() => Object.fromEntries(window.app.graph.nodes.map(
            (n) => [n.id, {pos: [...n.pos], size: [...n.size], min: [...n.computeSize()]}]))""").items()}

    def select_node(self, node_type: str):
        """Click the title bar of the (first) node of this type on the canvas, as a user selects it; wait until the
        canvas has it selected (the selection toolbox then shows above it)."""
        point = self.page.evaluate(_TITLE_POINT, node_type)
        if point is None:
            raise AssertionError(f"no {node_type} node on the canvas")
        self.page.mouse.click(point["x"], point["y"])
        self.page.wait_for_function("(type) => [...window.app.canvas.selectedItems].some((n) => n.type === type)",
                                    arg=node_type)

    def missing_nodes_dialog(self) -> str | None:
        """The text of the "missing nodes" dialog if the frontend shows one, else None."""
        dialog = self.page.locator(MISSING_NODES_DIALOG)
        return dialog.first.inner_text() if dialog.count() else None

    def missing_models(self, timeout_ms: float = 5_000) -> list[str] | None:
        """The rows ("folder / file") of the "missing models" dialog if the frontend shows one within `timeout_ms`
        (it opens after the graph is on the canvas, once the model folders were listed), else None."""
        dialog = self.page.locator(MISSING_MODELS_DIALOG)
        try:
            dialog.first.wait_for(state="visible", timeout=timeout_ms)
        except Exception:
            return None
        return [row.inner_text() for row in dialog.first.locator(".comfy-missing-models li").all()]

    def close_dialogs(self):
        while self.page.locator(".p-dialog").count():
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(100)

    def run_button(self):
        return self.page.get_by_role("button", name="Run", exact=True)

    def press_run(self) -> str:
        """Click Run; return the prompt id of the /prompt request the frontend made."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as info:
            self.run_button().click()
        response = info.value
        body = response.json()
        if response.status != 200 or "prompt_id" not in body:
            raise AssertionError(f"/prompt refused the frontend's graph (HTTP {response.status}): {body}")
        return body["prompt_id"]

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)
