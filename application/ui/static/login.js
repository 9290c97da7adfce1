/* The login form: checks the key against the API, keeps it in localStorage (for the API calls), then lets
 * the form post as usual so the server sets its cookie (for the server-rendered lists). Without JavaScript
 * the plain form post still works: the lists render, the live parts ask to log in again. */
"use strict";

(() => {
  const d = window.dashboard;
  const form = document.getElementById("login-form");
  if (!form || !d) return;
  const input = form.querySelector("#key");
  const error = form.querySelector("#login-error");

  form.addEventListener("submit", async (ev) => {
    if (!d.keysOn) return;
    ev.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    if (!d.KEY_CHARS.test(key)) {
      // (a browser cannot send it, and no key has such characters: a paste that turned '-' into '–', say)
      error.textContent = key ? "A key is printable ASCII without spaces: check how it was copied." : "Enter your key.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    let r = null;
    try {
      r = await fetch(`${d.api}/jobs?limit=1`, { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
    } catch (e) {
      /* the server decides below */
    }
    if (r && r.status === 401) {
      let detail = "The key is not valid.";
      try {
        detail = (await r.json()).detail || detail;
      } catch (e) {
        /* keep the plain message */
      }
      error.textContent = detail;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    d.setKey(key);
    form.submit(); // does not fire "submit" again
  });
})();
