// fewstep's frontend extension (ComfyUI serves the pack's WEB_DIRECTORY, ./web, under /extensions/fewstep/).
// 1. A new PCM Distillation node starts its seed's "control after generate" at "fixed" (the frontend's default
//    is "randomize"): the same seed trains the same LoRA until the user asks for another one. A loaded workflow
//    keeps the mode it stored.
// 2. The training node's "fewstep.train" websocket message (step, total, loss, eta_s; sent to the client that
//    queued the prompt) gets a listener, so the frontend does not log it as an unknown message type; the node
//    shows the latest step and loss under its widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "FewStepPCMDistill";

function seedControl(node) {
    const seed = node.widgets?.find((w) => w.name === "seed");
    return seed?.linkedWidgets?.find((w) => w.name === "control_after_generate");
}

function trainingStatus(detail) {
    const loss = Number(detail.loss);
    return `step ${detail.step}/${detail.total}  loss ${Number.isFinite(loss) ? loss.toPrecision(4) : detail.loss}`;
}

app.registerExtension({
    name: "fewstep.frontend",

    setup() {
        api.addEventListener("fewstep.train", ({ detail }) => {
            const node = app.graph?.getNodeById(detail?.node);
            if (!node || node.comfyClass !== TRAIN_NODE) return;
            node.fewstepStatus = trainingStatus(detail);
            node.setDirtyCanvas(true, false);
        });
    },

    beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== TRAIN_NODE) return;
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            const result = onDrawForeground?.apply(this, arguments);
            if (this.fewstepStatus && !this.flags?.collapsed) {
                ctx.save();
                ctx.font = "12px monospace";
                ctx.fillStyle = "#9c9";
                ctx.fillText(this.fewstepStatus, 10, this.size[1] - 6);
                ctx.restore();
            }
            return result;
        };
    },

    nodeCreated(node) {
        if (node.comfyClass !== TRAIN_NODE) return;
        const control = seedControl(node);
        if (control) control.value = "fixed";
    },
});
