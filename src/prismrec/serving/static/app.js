// prismrec explorer: plain JavaScript, no build step, no external assets.
// Every value from the API is inserted with textContent (never innerHTML), so item texts cannot inject markup.
"use strict";

const HISTORY_SHOWN = 40;  // posters in the history strip before "show all"
const state = { token: sessionStorage.getItem("prismrec-token") || "", models: [], images: new Map() };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
  setTimeout(() => { box.hidden = true; }, 6000);
}

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    if (response.status === 401) document.getElementById("auth").hidden = false;
    throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return response.json();
}

// Posters are fetched with the token header (an <img src> cannot send one) and cached as blob URLs;
// the server's Cache-Control lets the browser reuse them across page loads.
function poster(item, cls = "") {
  if (!item.image_url) return el("span", { class: "noposter " + cls, text: "no poster", title: item.title });
  const img = el("img", { alt: item.title, title: item.title, class: cls });
  const cached = state.images.get(item.image_url);
  if (cached) { img.src = cached; return img; }
  fetch(item.image_url, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.status))))
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      state.images.set(item.image_url, url);
      img.src = url;
    })
    .catch(() => img.replaceWith(el("span", { class: "noposter", text: "no poster" })));
  return img;
}

function card(item, extraClass = "", label = "") {
  return el("div", { class: "card " + extraClass, "data-item": item.item_id },
    poster(item), el("span", { class: "title", text: item.title, title: item.title }),
    label ? el("span", { class: "badge", text: label }) : null);
}

// ---- items ---------------------------------------------------------------------------------------
async function searchItems(query) {
  const list = document.getElementById("item-results");
  list.replaceChildren();
  const data = await api("/items?limit=30&query=" + encodeURIComponent(query));
  if (!data.items.length) list.append(el("li", { class: "muted", text: "No item matches." }));
  for (const item of data.items) {
    const row = el("li", { "data-item": item.item_id }, poster(item),
      el("span", { text: item.title + (item.year ? " (" + item.year + ")" : "") }));
    row.addEventListener("click", () => {
      for (const other of list.children) other.classList.remove("selected");
      row.classList.add("selected");
      showItem(item.item_id).catch((e) => showError(e.message));
    });
    list.append(row);
  }
}

async function showItem(itemId) {
  const data = await api("/items/" + encodeURIComponent(itemId));
  const detail = document.getElementById("item-detail");
  const attrs = el("table", { class: "attrs" });
  for (const [key, value] of Object.entries(data.attributes)) {
    attrs.append(el("tr", {}, el("th", { text: key }), el("td", { text: value })));
  }
  const derived = el("div", { class: "derived", id: "derived" });
  if (!data.derived.length) {
    derived.append(el("p", { class: "muted", text: "No derived descriptions in the served exports " +
      "(exports of models without MLLM semantics show the original attributes only)." }));
  }
  for (const block of data.derived) {
    derived.append(el("h3", { text: "Derived semantics (" + block.model + ")" }),
      el("p", { class: "muted provenance", text: [["backend", block.backend], ["model", block.backend_model],
        ["embedder", block.embedder], ["artefact", block.artefact]].filter(([, v]) => v)
        .map(([k, v]) => k + " " + v).join(" · ") }));
    for (const route of ["textual", "visual", "hybrid"]) {
      const text = block.descriptions[route];
      const status = block.status[route];
      derived.append(el("div", { class: "route", "data-route": route },
        el("h4", { text: route + (status && status !== "ok" ? " (" + status + ")" : "") }),
        el("p", { text: text || "(no description)" })));
    }
  }
  detail.replaceChildren(
    el("div", { class: "top" }, poster(data),
      el("div", {}, el("h2", { id: "item-title", text: data.title }),
        el("p", { class: "muted", text: "item id " + data.item_id }), attrs)),
    derived);
}

// ---- users ---------------------------------------------------------------------------------------
// Why an item is recommended: the history items whose removal lowers its score most (API "because").
function explanation(item) {
  if (!item.because || !item.because.length) return null;
  const reasons = item.because.map((b) => el("div", { class: "reason", "data-because": b.item_id },
    el("span", { class: "title", text: b.title }),
    el("span", { class: "muted", text: " (history #" + (b.position + 1) + "): " + b.reason }),
    b.description && (b.description.textual || b.description.hybrid) ?
      el("p", { class: "desc", text: b.description.textual || b.description.hybrid }) : null));
  return el("details", { class: "why" }, el("summary", { text: "why: " + item.because[0].title }), ...reasons);
}

function recommendationColumn(data) {
  const list = el("ol", { class: "recs" });
  for (const item of data.items) {
    list.append(el("li", { class: item.hit ? "hit" : "", "data-item": item.item_id }, poster(item),
      el("span", { text: item.title }), item.hit ? el("span", { class: "badge", text: "HIT" }) : null,
      el("span", { class: "score", text: item.score.toFixed(3) }), explanation(item)));
  }
  const verdict = data.hit_rank ? "test item at rank " + data.hit_rank : "test item not in the top " +
    data.items.length;
  return el("div", { class: "column", "data-model": data.model },
    el("h3", { text: data.model + " (" + data.model_type + ")" }),
    el("p", { class: "muted verdict", text: verdict }), list);
}

async function showUser(userId) {
  const view = document.getElementById("user-view");
  const user = await api("/users/" + encodeURIComponent(userId));
  const chosen = [document.getElementById("model-a").value, document.getElementById("model-b").value];
  const models = [...new Set(chosen.filter(Boolean))];
  const columns = await Promise.all(models.map((m) =>
    api("/users/" + encodeURIComponent(userId) + "/recommendations?k=10&explain=true&model=" +
      encodeURIComponent(m))));
  const strip = el("div", { class: "strip", id: "history" });
  const fill = (items) => strip.replaceChildren(...items.map((item) => card(item)));
  fill(user.history.slice(0, HISTORY_SHOWN));
  const more = user.history.length > HISTORY_SHOWN ? el("button", { type: "button", id: "history-all",
    text: "show all " + user.history.length }) : null;
  if (more) more.addEventListener("click", () => { fill(user.history); more.remove(); });
  const test = user.test_item ? card(user.test_item, "test", "held out") :
    el("p", { class: "muted", text: "too short to hold out a test item" });
  view.replaceChildren(
    el("h2", { text: "User " + user.user_id }),
    el("p", { class: "muted", text: user.n_interactions + " interactions; history most recent first" }, more),
    strip,
    el("h3", { text: "Held-out test item" }), el("div", { id: "test-item" }, test),
    el("div", { class: "compare", id: "compare" }, ...columns.map(recommendationColumn)));
}

// ---- wiring --------------------------------------------------------------------------------------
function switchTab(id) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === id);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== id;
}

async function init() {
  const health = await api("/health");
  state.models = health.models;
  document.getElementById("models-info").textContent = "serving " +
    health.models.map((m) => m.name + " (" + m.model + ", " + m.n_items + " items)").join(", ");
  document.getElementById("auth").hidden = !health.auth_required;
  for (const [index, id] of [[0, "model-a"], [1, "model-b"]]) {
    const select = document.getElementById(id);
    select.replaceChildren(el("option", { value: "", text: "(none)" }),
      ...health.models.map((m) => el("option", { value: m.name, text: m.name })));
    select.value = health.models[Math.min(index, health.models.length - 1)].name;
    if (index === 1 && health.models.length === 1) select.value = "";
  }
  if (!health.auth_required || state.token) {
    const users = await api("/users?limit=100");
    document.getElementById("user-list").replaceChildren(...users.users.map((u) => el("option", { value: u })));
  }
}

document.getElementById("item-search").addEventListener("submit", (event) => {
  event.preventDefault();
  searchItems(document.getElementById("item-query").value).catch((e) => showError(e.message));
});
document.getElementById("user-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showUser(document.getElementById("user-id").value.trim()).catch((e) => showError(e.message));
});
document.getElementById("random-user").addEventListener("click", async () => {
  try {
    const users = await api("/users?limit=100");
    const pick = users.users[Math.floor(Math.random() * users.users.length)];
    document.getElementById("user-id").value = pick;
    await showUser(pick);
  } catch (e) { showError(e.message); }
});
document.getElementById("token-save").addEventListener("click", () => {
  state.token = document.getElementById("token").value;
  sessionStorage.setItem("prismrec-token", state.token);
  state.images.clear();
  init().catch((e) => showError(e.message));
});
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchTab(tab.dataset.tab));
init().catch((e) => showError(e.message));
