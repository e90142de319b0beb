// The console's only script, served from the package (no build step, nothing from elsewhere):
// - a region with data-live-src is re-read every data-live-interval ms until the fragment it
//   holds says data-terminal="true" (a saga that ended);
// - a form with data-action is sent with fetch as JSON, with the X-CSRF-Token header that a
//   cookie session must show, and the answer (a fragment, or a problem's detail) is shown in
//   its <output>.
(function () {
  "use strict";

  function cookie(name) {
    var found = document.cookie.split("; ").find(function (c) { return c.indexOf(name + "=") === 0; });
    return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
  }

  function isTerminal(region) {
    var root = region.querySelector("[data-terminal]");
    return !root || root.getAttribute("data-terminal") === "true";
  }

  function live(region) {
    var every = Number(region.getAttribute("data-live-interval")) || 2000;
    var timer = null;
    var wasTerminal = isTerminal(region);
    async function tick() {
      timer = null;
      if (!document.hidden) {
        try {
          var answer = await fetch(region.getAttribute("data-live-src"), {credentials: "same-origin"});
          if (answer.ok) {
            region.innerHTML = await answer.text();
            region.removeAttribute("data-stale");
          } else {
            region.setAttribute("data-stale", String(answer.status));
          }
        } catch (error) {
          region.setAttribute("data-stale", "unreachable");
        }
      }
      var terminal = isTerminal(region);
      if (terminal && !wasTerminal && !document.querySelector("form[data-action] textarea:not(:placeholder-shown)")) {
        window.location.reload();  // what may be done with it changed: offer the new actions
        return;
      }
      wasTerminal = terminal;
      if (!terminal) { schedule(); }
    }
    function schedule() { if (timer === null) { timer = window.setTimeout(tick, every); } }
    region.refreshNow = function () { if (timer !== null) { window.clearTimeout(timer); } tick(); };
    if (!wasTerminal) { schedule(); }
  }

  async function act(form, event) {
    event.preventDefault();
    var confirmText = form.getAttribute("data-confirm");
    if (confirmText && !window.confirm(confirmText)) { return; }
    var output = form.querySelector("output");
    var button = form.querySelector("button");
    var body = {};
    new FormData(form).forEach(function (value, name) { if (name !== "do") { body[name] = value; } });
    button.disabled = true;
    output.classList.remove("error");
    output.textContent = "Sending…";
    try {
      var answer = await fetch(form.getAttribute("action"), {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": cookie("saga_csrf")},
        body: JSON.stringify(body)});
      if (answer.ok) {
        output.innerHTML = await answer.text();
        form.classList.add("acted");
        form.querySelectorAll("textarea").forEach(function (t) { t.disabled = true; });
        document.querySelectorAll("[data-live-src]").forEach(function (r) { if (r.refreshNow) { r.refreshNow(); } });
      } else {
        var problem = null;
        try { problem = await answer.json(); } catch (ignored) { problem = null; }
        output.textContent = (problem && problem.detail) || ("the console answered HTTP " + answer.status);
        output.classList.add("error");
        button.disabled = false;
      }
    } catch (error) {
      output.textContent = "the console did not answer (" + error + ")";
      output.classList.add("error");
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    // Filters leave their empty fields out of the address, which stays short enough to share.
    document.querySelectorAll("form.filters").forEach(function (form) {
      form.addEventListener("submit", function () {
        form.querySelectorAll("input, select").forEach(function (field) {
          if (field.value === "") { field.disabled = true; }
        });
      });
    });
    document.querySelectorAll("[data-live-src]").forEach(live);
    document.querySelectorAll("form[data-action]").forEach(function (form) {
      form.addEventListener("submit", function (event) { act(form, event); });
    });
  });
}());
