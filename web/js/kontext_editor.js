// Kontext Core editor: each round of edits in a history strip with its drift, a before/after slider on the save
// node, and "edit again", which makes a result the input of the next round (docs/editor.md).
// Tested with ComfyUI frontend 1.27.10 (pip comfyui-frontend-package) on ComfyUI 0.3.64+, headless Chromium.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const SAVE_NODE = "KontextCoreSaveImage";
const SAMPLER = "KontextCoreSampler";
const TEXT_ENCODE = "KontextCoreTextEncode";
const LOADER = "LoadImage"; // ComfyUI's core loader, the one the example workflows use
const SOURCE_FIELD = "kontext_source"; // nodes/save.py SOURCE_FIELD: a listed result's source image
const DRIFT_ROUTE = "/kontext/drift"; // nodes/routes.py DRIFT_ROUTE
const ROUNDS_FOLDER = "kontext_rounds"; // the subfolder of ComfyUI's input folder that edit-again copies go to
const HINT_BELOW_DB = 30; // the unedited-region PSNR the built-in model aims for (docs/small-model.md)
const COMPARE_HEIGHT = 128; // px: the before/after view on the node

const rounds = []; // in the order they were made: {id, depth, node, image, source, instruction, seed, parent, drift}
const roundOf = new Map(); // "<prompt id>:<node id>" (a save node's output) or "input:<loader value>" -> round
let branch = null; // the round the loader holds: the next round's parent
let panel = null; // created with the first round, so workflows without the pack's nodes see nothing

const viewURL = (ref) =>
  api.apiURL(
    `/view?${new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type })}`,
  );

// ---- the queued prompt, in ComfyUI's API format: {id: {class_type, inputs}}, a link being [node id, output]
const linked = (value) => (Array.isArray(value) && value.length === 2 ? String(value[0]) : null);

function nearest(prompt, starts, wanted) {
  // breadth first upstream from `starts` (ids): the closest node `wanted` accepts
  const seen = new Set();
  for (let level = starts.filter(Boolean); level.length;) {
    const next = [];
    for (const id of level) {
      if (seen.has(id) || !prompt[id]) continue;
      if (wanted(prompt[id])) return id;
      seen.add(id);
      next.push(
        ...Object.values(prompt[id].inputs ?? {})
          .map(linked)
          .filter(Boolean),
      );
    }
    level = next;
  }
  return null;
}

function roundFor(prompt, outputs, promptId, id) {
  // the round a save node's output is, made after its parent (the save node whose image it edited, or the
  // image the loader held: a round edited again, else a new original)
  const key = `${promptId}:${id}`;
  const image = outputs[id].images[0];
  const seen = rounds.find((r) => r.image.filename === image.filename && r.image.subfolder === image.subfolder);
  if (roundOf.has(key) || seen) return roundOf.get(key) ?? seen; // a cached node reports the image it made before
  const inputs = prompt[id].inputs;
  const source = image[SOURCE_FIELD] ?? null;
  const sampler = nearest(prompt, [linked(inputs.images)], (n) => n.class_type === SAMPLER);
  const text =
    sampler && nearest(prompt, [linked(prompt[sampler].inputs.positive)], (n) => n.class_type === TEXT_ENCODE);
  let parent = null;
  const from = linked(inputs.source_image);
  if (from && source) {
    const before = Object.keys(outputs).find(
      (o) => o !== id && prompt[o]?.class_type === SAVE_NODE && linked(prompt[o].inputs.images) === from,
    );
    if (before) parent = roundFor(prompt, outputs, promptId, before);
    else {
      const loader = nearest(prompt, [from], (n) => n.class_type === LOADER);
      const held = loader ? `input:${prompt[loader].inputs.image}` : `${key}:source`;
      parent =
        roundOf.get(held) ??
        add({ node: id, image: source, instruction: `original${loader ? `: ${prompt[loader].inputs.image}` : ""}` });
      roundOf.set(held, parent);
    }
  }
  const round = add({
    node: id,
    image,
    source,
    parent,
    instruction: typeof prompt[text]?.inputs.prompt === "string" ? prompt[text].inputs.prompt : "",
    seed: sampler ? prompt[sampler].inputs.seed : null,
  });
  roundOf.set(key, round);
  return round;
}

function add(round) {
  Object.assign(round, { id: rounds.length, depth: round.parent ? round.parent.depth + 1 : 0, drift: null });
  rounds.push(round);
  return round;
}

async function measureDrift(round) {
  const chain = [];
  for (let r = round; r; r = r.parent)
    chain.unshift({ filename: r.image.filename, subfolder: r.image.subfolder, type: r.image.type });
  const response = await api.fetchApi(DRIFT_ROUTE, { method: "POST", body: JSON.stringify({ chain }) });
  const answer = await response.json();
  round.drift = response.ok ? answer : { error: answer.error ?? `HTTP ${response.status}` };
}

async function promptDone({ detail }) {
  const response = await api.fetchApi(`/history/${detail.prompt_id}`);
  const entry = response.ok ? (await response.json())[detail.prompt_id] : null;
  if (!entry) return;
  const [, , prompt] = entry.prompt; // [number, id, prompt, extra data, outputs to execute]
  const saves = Object.keys(entry.outputs).filter(
    (id) => prompt[id]?.class_type === SAVE_NODE && entry.outputs[id].images?.length,
  );
  if (!saves.length) return;
  const known = rounds.length;
  saves.forEach((id) => roundFor(prompt, entry.outputs, detail.prompt_id, id));
  const made = rounds.slice(known);
  await Promise.all(made.filter((r) => r.parent).map(measureDrift));
  for (const round of made.filter((r) => r.source)) showCompare(app.graph.getNodeById(Number(round.node)), round);
  render();
}

// ---- edit again: the round's image copied into the input folder (the server's upload API) and set on the loader
function loaderFor(round) {
  const node = app.graph.getNodeById(Number(round.node));
  for (let level = node ? [node] : [], seen = new Set(); level.length;) {
    const next = [];
    for (const n of level) {
      if (n.comfyClass === LOADER) return n;
      if (seen.has(n.id)) continue;
      seen.add(n.id);
      (n.inputs ?? []).forEach((_, slot) => next.push(n.getInputNode(slot)));
    }
    level = next.filter(Boolean);
  }
  const loaders = app.graph.nodes.filter((n) => n.comfyClass === LOADER);
  return loaders.length === 1 ? loaders[0] : null;
}

async function editAgain(round) {
  const loader = loaderFor(round);
  if (!loader) return say(`Edit again needs one ${LOADER} node in the workflow to feed the next round.`);
  const result = await fetch(viewURL(round.image));
  if (!result.ok) return say(`Edit again: ${round.image.filename} is no longer on the server (${result.status}).`);
  const picture = await result.blob();
  const form = new FormData();
  const name = [round.image.type, round.image.subfolder, round.image.filename]
    .filter(Boolean)
    .join("_")
    .replaceAll("/", "_");
  form.append("image", new File([picture], name, { type: "image/png" }));
  form.append("subfolder", ROUNDS_FOLDER);
  form.append("type", "input");
  form.append("overwrite", "true"); // the name is the image's own: the same image gives the same copy
  const response = await api.fetchApi("/upload/image", { method: "POST", body: form });
  if (!response.ok) return say(`Edit again: the upload failed (${response.status} ${await response.text()}).`);
  const uploaded = await response.json();
  const value = uploaded.subfolder ? `${uploaded.subfolder}/${uploaded.name}` : uploaded.name;
  const widget = loader.widgets.find((w) => w.name === "image");
  // frontend internal: the combo's option list, refreshed from the server only on a reload
  if (!widget.options.values.includes(value)) widget.options.values.push(value);
  widget.value = value;
  widget.callback?.(value); // the loader's own callback shows the new image on the node
  roundOf.set(`input:${value}`, round);
  branch = round;
  say(`Next round edits ${label(round)}: write its instruction and queue.`);
  app.graph.setDirtyCanvas(true, true);
}

const editAgainOrSay = (round) => editAgain(round).catch((e) => say(`Edit again failed: ${e}`));

// ---- the page: a compare slider on each save node, the history strip in a panel
function showCompare(node, round) {
  const view = node?.widgets?.find((w) => w.name === "kontext_compare")?.element;
  if (!view) return;
  view.querySelector(".kontext-before").src = viewURL(round.source);
  view.querySelector(".kontext-after").src = viewURL(round.image);
  view.dataset.round = round.id;
  view.hidden = false;
  node.kontextRound = round;
  // LiteGraph: a loaded workflow's saved node size has no room for the view yet
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
}

function compareWidget(node) {
  const view = document.createElement("div");
  view.className = "kontext-compare";
  view.hidden = true;
  const fit = "position:absolute;inset:0;width:100%;height:100%;object-fit:contain;image-rendering:pixelated";
  view.innerHTML = `<div style="position:relative;height:${COMPARE_HEIGHT}px">
      <img class="kontext-before" style="${fit}"><img class="kontext-after" style="${fit};clip-path:inset(0 0 0 50%)">
    </div>
    <div style="display:flex;gap:4px;align-items:center;font:11px sans-serif;color:#aaa">before
      <input class="kontext-slider" type="range" min="0" max="100" value="50" style="flex:1">after
      <button class="kontext-edit-again" title="Make this result the input of the next round">Edit again</button>
    </div>`;
  view.querySelector(".kontext-slider").addEventListener("input", (e) => {
    view.querySelector(".kontext-after").style.clipPath = `inset(0 0 0 ${e.target.value}%)`;
  });
  view
    .querySelector(".kontext-edit-again")
    .addEventListener("click", () => node.kontextRound && editAgainOrSay(node.kontextRound));
  // the frontend's DOM widget API (domWidget.ts): it places `view` over the node on the canvas
  const widget = node.addDOMWidget("kontext_compare", "kontext_compare", view, {
    serialize: false,
    getMinHeight: () => (view.hidden ? 0 : COMPARE_HEIGHT + 30),
  });
  widget.serialize = false; // LiteGraph's flag: not in the saved workflow, whose widgets_values stay the node's own
}

const label = (round) => (round.depth ? `round ${round.depth}` : "the original");
function driftText(round) {
  if (!round.drift) return "";
  if (round.drift.error) return `drift: ${round.drift.error}`;
  return round.drift.identical
    ? "unedited: identical"
    : round.drift.psnr_db === null
      ? "every pixel edited"
      : `unedited: ${round.drift.psnr_db.toFixed(1)} dB`;
}
const drifting = (round) => round.drift?.psnr_db != null && round.drift.psnr_db < HINT_BELOW_DB;

function say(text) {
  render();
  panel.querySelector(".kontext-message").textContent = text;
}

function render() {
  if (!panel) {
    panel = document.createElement("div");
    panel.id = "kontext-rounds";
    panel.style.cssText = [
      "position:fixed;left:64px;bottom:12px;z-index:1000;max-width:70vw;padding:6px 8px", // beside the side bar
      "background:#222d;color:#ddd;font:12px sans-serif;border-radius:6px",
    ].join(";");
    panel.innerHTML = `<b>Kontext rounds</b> <span class="kontext-message"></span>
      <div class="kontext-hint" style="color:#e96"></div>
      <div class="kontext-strip" style="display:flex;gap:6px;overflow-x:auto"></div>`;
    document.body.append(panel);
  }
  panel.querySelector(".kontext-strip").replaceChildren(...rounds.map(card));
  panel.querySelector(".kontext-hint").textContent = rounds.length ? driftHint(rounds.at(-1)) : "";
}

// exported for the browser test, which imports this module again (the same instance) to check the threshold
export function driftHint(round) {
  if (!drifting(round)) return "";
  return (
    `${label(round)} has drifted to ${round.drift.psnr_db.toFixed(1)} dB outside its edits: add Kontext Keep ` +
    "Unchanged after the decode (as the multi_round_keep_unchanged workflow does)."
  );
}

function card(round) {
  const item = document.createElement("button");
  item.className = "kontext-round";
  item.title = `Branch from ${label(round)}: make it the input of the next round`;
  item.style.cssText = [
    "width:120px;text-align:left;background:#333;color:inherit;border-radius:4px;padding:3px",
    `border:2px solid ${round === branch ? "#6ae" : "#444"}`, // the round the next one will edit
  ].join(";");
  const image = [round.image.type, round.image.subfolder, round.image.filename].filter(Boolean).join("/");
  Object.assign(item.dataset, {
    id: round.id,
    depth: round.depth,
    parent: round.parent?.id ?? "",
    seed: round.seed ?? "",
    image,
    instruction: round.instruction,
  });
  item.dataset.drift = driftText(round);
  if (round.drift?.psnr_db != null) item.dataset.driftDb = round.drift.psnr_db;
  if (round === branch) item.dataset.branch = "true";
  const picture = document.createElement("img");
  picture.src = viewURL(round.image);
  picture.style.cssText = "width:100%;image-rendering:pixelated";
  const text = document.createElement("div");
  text.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis";
  text.textContent = `${label(round)}${round.seed != null ? ` · seed ${round.seed}` : ""}`;
  const said = text.cloneNode();
  said.textContent = round.instruction;
  const measured = text.cloneNode();
  measured.className = "kontext-drift";
  measured.textContent = driftText(round);
  if (drifting(round)) measured.style.color = "#e96";
  item.append(picture, text, said, measured);
  item.addEventListener("click", () => editAgainOrSay(round));
  return item;
}

app.registerExtension({
  name: "KontextCore.Editor",
  setup() {
    // ComfyUI's websocket message when a prompt has run; its outputs are then in /history/<prompt id>
    api.addEventListener("execution_success", (event) =>
      promptDone(event).catch((e) => say(`Could not read the rounds of the last prompt: ${e}`)),
    );
  },
  nodeCreated(node) {
    if (node.comfyClass === SAVE_NODE) compareWidget(node);
  },
});
