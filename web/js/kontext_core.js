// Kontext Core frontend: a size hint on the sampler, so users see when width/height are off Kontext's
// trained resolutions and how many tokens (hence how much time) a run will take.
// served as /extensions/<pack>/js/kontext_core.js, three levels below the site root
import { app } from "../../../scripts/app.js";

// (width, height) pairs Kontext was trained on (BFL's preferred resolutions).
const PREFERRED = [
  [672, 1568], [688, 1504], [720, 1456], [752, 1392], [800, 1328], [832, 1248], [880, 1184], [944, 1104],
  [1024, 1024], [1104, 944], [1184, 880], [1248, 832], [1328, 800], [1392, 752], [1456, 720], [1504, 688],
  [1568, 672],
];

function sizeHint(width, height) {
  const aspect = width / height;
  let best = PREFERRED[0];
  for (const size of PREFERRED) {
    if (Math.abs(aspect - size[0] / size[1]) < Math.abs(aspect - best[0] / best[1])) best = size;
  }
  const tokens = Math.ceil(width / 16) * Math.ceil(height / 16);
  const trained = best[0] === width && best[1] === height;
  return `${tokens} tokens · ${trained ? "trained size" : `nearest trained: ${best[0]}×${best[1]}`}`;
}

app.registerExtension({
  name: "KontextCore.SamplerSizeHint",
  nodeCreated(node) {
    if (node.comfyClass !== "KontextCoreSampler") return;
    const widget = (name) => node.widgets?.find((w) => w.name === name);
    const drawForeground = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      drawForeground?.apply(this, arguments);
      const width = widget("width")?.value;
      const height = widget("height")?.value;
      if (!width || !height || this.flags?.collapsed) return;
      const latentLinked = this.inputs?.some((input) => input.name === "latent" && input.link != null);
      const text = latentLinked ? "size: from the connected latent" : sizeHint(width, height);
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#9a9";
      ctx.textAlign = "right";
      ctx.fillText(text, this.size[0] - 8, this.size[1] - 6);
      ctx.restore();
    };
  },
});
