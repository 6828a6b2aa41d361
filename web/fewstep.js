// fewstep's frontend extension (ComfyUI serves the pack's WEB_DIRECTORY, ./web, under /extensions/fewstep/).
// 1. A new PCM Distillation node starts its seed's "control after generate" at "fixed" (the frontend's default
//    is "randomize"): the same seed trains the same LoRA until the user asks for another one. A loaded workflow
//    keeps the mode it stored.
import { app } from "../../scripts/app.js";

const TRAIN_NODE = "FewStepPCMDistill";

function seedControl(node) {
    const seed = node.widgets?.find((w) => w.name === "seed");
    return seed?.linkedWidgets?.find((w) => w.name === "control_after_generate");
}

app.registerExtension({
    name: "fewstep.frontend",

    nodeCreated(node) {
        if (node.comfyClass !== TRAIN_NODE) return;
        const control = seedControl(node);
        if (control) control.value = "fixed";
    },
});
