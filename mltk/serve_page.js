// The page of `mltk serve`: plain JavaScript against the server's own API, nothing fetched from elsewhere.
// Every string from the server (class names, paths, messages) is set as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("mltk-token") || "";
let generation = 0; // bumped by every edit: gallery rows are renumbered, so older results and thumbnails are stale

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function text(tag, content, cls) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (cls) node.className = cls;
  return node;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function api(method, path, body) {
  const response = await fetch(path, { method, body, headers: headers() });
  if (response.status === 401) {
    $("token-box").style.display = "block";
  }
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((data && data.error) || response.status + " " + response.statusText);
  }
  showError("");
  return data;
}

async function loadThumbnail(img, row, seen) {
  if (seen !== generation) return; // the gallery changed since the search: row is another image now
  const response = await fetch("/gallery/" + row + "/image", { headers: headers() });
  if (response.ok && seen === generation) img.src = URL.createObjectURL(await response.blob());
}

function verdict(match, threshold) {
  if (match === null || match === undefined) return text("span", "no threshold: ranked only");
  const shown = " (threshold " + threshold.score.toFixed(4) + ", " + threshold.operating_point + ")";
  return text("span", (match ? "match" : "no match") + shown, match ? "match" : "nomatch");
}

function galleryChanged() {
  generation += 1;
  $("hits").replaceChildren();
  $("query").replaceChildren();
  $("search-verdict").replaceChildren();
}

async function loadInfo() {
  try {
    const info = await api("GET", "/info");
    const calibrated = info.calibration ? "threshold " + info.calibration.score.toFixed(4) + " at " + info.calibration.operating_point
      : "no calibrated threshold";
    $("info").textContent = info.count + " images of " + info.classes + " identities; " + info.kind + " index, " + info.dim
      + " dimensions; " + calibrated;
    await loadClasses();
  } catch (e) {
    showError(e.message);
  }
}

async function loadClasses() {
  const list = $("classes");
  const classes = await api("GET", "/classes");
  list.replaceChildren();
  $("classes-count").textContent = classes.length + " identities";
  for (const c of classes) {
    const item = document.createElement("li");
    item.dataset.name = c.name.toLowerCase();
    item.append(text("span", c.name + " (" + c.images + " images) "));
    const remove = text("button", "Remove");
    remove.dataset.name = c.name;
    remove.addEventListener("click", () => removeClass(c.name));
    item.append(remove);
    list.append(item);
  }
}

async function search(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", "8");
  const preview = document.createElement("img");
  preview.className = "preview";
  preview.alt = "query";
  preview.addEventListener("error", () => preview.replaceWith(text("span", "query: " + file.name))); // a type the browser cannot show (PGM)
  preview.src = URL.createObjectURL(file);
  $("query").replaceChildren(preview);
  $("hits").replaceChildren();
  $("search-verdict").replaceChildren();
  try {
    const seen = generation;
    const result = await api("POST", "/search", form);
    if (seen !== generation) return;
    $("search-verdict").replaceChildren(verdict(result.match, result.threshold));
    const loads = [];
    for (const hit of result.neighbours) {
      const figure = document.createElement("figure");
      figure.className = "hit";
      const img = document.createElement("img");
      img.alt = "gallery image " + hit.row;
      loads.push(loadThumbnail(img, hit.row, seen));
      figure.append(img);
      const caption = document.createElement("figcaption");
      caption.append(text("div", "#" + hit.rank + "  " + hit.score.toFixed(4)));
      if (hit.class !== null) caption.append(text("div", hit.class, "hit-class"));
      if (hit.match !== null) caption.append(text("div", hit.match ? "match" : "no match", hit.match ? "match" : "nomatch"));
      figure.append(caption);
      $("hits").append(figure);
    }
    await Promise.all(loads);
  } catch (e) {
    showError(e.message);
  }
}

async function verify() {
  const a = $("verify-a").files[0], b = $("verify-b").files[0];
  if (!a || !b) return showError("choose two images to verify");
  const form = new FormData();
  form.append("image_a", a);
  form.append("image_b", b);
  try {
    const result = await api("POST", "/verify", form);
    const said = result.same === null ? text("span", "no threshold") : text("span", result.same ? "same identity" : "different identities", result.same ? "match" : "nomatch");
    $("verify-result").replaceChildren(said, text("span", "  score " + result.score.toFixed(4)));
  } catch (e) {
    showError(e.message);
  }
}

async function enrol() {
  const name = $("enrol-name").value;
  const files = $("enrol-files").files;
  if (!name || !files.length) return showError("give a name and at least one image");
  const form = new FormData();
  form.append("name", name);
  for (const f of files) form.append("images", f);
  try {
    const result = await api("POST", "/enrol", form);
    galleryChanged();
    $("enrol-result").textContent = "enrolled " + result.added + " images of " + result.class + "; the gallery holds " + result.count;
    await loadInfo();
  } catch (e) {
    showError(e.message);
  }
}

async function removeClass(name) {
  if (!confirm("Remove " + name + " and all their images from the gallery?")) return;
  try {
    const result = await api("DELETE", "/classes/" + encodeURIComponent(name));
    galleryChanged();
    $("enrol-result").textContent = "removed " + result.class + " (" + result.removed + " images); the gallery holds " + result.count;
    await loadInfo();
  } catch (e) {
    showError(e.message);
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); search(e.dataTransfer.files[0]); });
$("search-file").addEventListener("change", (e) => search(e.target.files[0]));
$("verify").addEventListener("click", verify);
$("classes-filter").addEventListener("input", (e) => {
  const wanted = e.target.value.toLowerCase();
  for (const item of $("classes").children) item.hidden = !item.dataset.name.includes(wanted);
});
$("enrol").addEventListener("click", enrol);
$("token-save").addEventListener("click", () => {
  token = $("token").value;
  sessionStorage.setItem("mltk-token", token);
  $("token-box").style.display = "none";
  loadInfo();
});
loadInfo();
