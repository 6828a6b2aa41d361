"""A pack node's help page in the real frontend: select the node on the canvas, press the selection toolbox's info
button, and the node library's help panel shows web/docs/<node>/en.md, fetched at the first URL the frontend tries
(NodeHelpService.fetchCustomNodeHelp: /extensions/<pack>/docs/<node>/<locale>.md, then /extensions/<pack>/docs/<node>.md)."""
from pathlib import Path

from support.workflow_catalog import ui_file_name

REPO = Path(__file__).resolve().parents[2]
NODE = "FewStepLoraLoader"
WORKFLOW = REPO / "workflows" / ui_file_name("pcm_lora_fast_sampler")


def test_info_button_shows_the_help_page_from_the_first_url(frontend, server):
    page = frontend.page
    heading = (REPO / "web" / "docs" / NODE / "en.md").read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")
    frontend.drop_workflow(WORKFLOW)
    fetched = []

    def on_response(response):
        if "/docs/" in response.url:
            fetched.append((response.url.removeprefix(server.url), response.status))

    page.on("response", on_response)
    try:
        frontend.select_node(NODE)
        info = page.locator('[data-testid="info-button"]')
        info.click()
        panel = page.locator(".node-help-content")
        panel.locator("h1", has_text=heading).wait_for(state="visible")
        assert fetched == [(f"/extensions/fewstep/docs/{NODE}/en.md", 200)], fetched
        assert panel.locator("h1").first.inner_text() == heading
        info.click()  # the same button closes the help and the sidebar again
        panel.wait_for(state="detached")
    finally:
        page.remove_listener("response", on_response)
        frontend.evaluate("() => window.app.canvas.deselectAll()")
