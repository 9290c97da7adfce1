/* The create form: builds the JSON body from the fields (`name` is the path in the body: training.max_steps),
 * posts it to the API, and shows each 422 message next to its field (loc ["body", "training", "max_steps"]).
 * The form has `novalidate`: the API is the one judge of what is valid, and its words are the ones shown. */
"use strict";

(() => {
  const d = window.dashboard;
  const form = document.getElementById("new-job");
  if (!form || !d) return;
  const general = document.getElementById("form-error");
  const submit = document.getElementById("submit");
  const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;
  // Details of other 4xx answers (and the body-wide checks of a 422) start with the field they are about
  // ("data_path '...' is not a file", "training.target_modle is not an argument of `swift sft`", "rlhf_type is
  // for kind 'rlhf'"): a training argument's goes beside the training box.
  const FIELD_DETAIL = /^(data_path|model_path|output_dir|job_id|kind|rlhf_type|num_gpus|gpu_ids|priority|time_limit|training(?:\.[\w]+)?)\b/;

  function slot(path) {
    // The field's own slot, else its parent's ("training.eval_steps" -> the JSON box for training), with the
    // rest of the path (a message in the JSON box says which of its keys it is about).
    const parts = path.split(".");
    const rest = [];
    while (parts.length) {
      const found = form.querySelector(`[data-error-for="${CSS.escape(parts.join("."))}"]`);
      if (found) return { target: found, rest: rest.join(".") };
      rest.unshift(parts.pop());
    }
    return null;
  }

  function clearErrors() {
    for (const p of form.querySelectorAll("[data-error-for]")) p.textContent = "";
    for (const i of form.querySelectorAll("[aria-invalid]")) {
      i.removeAttribute("aria-invalid");
      i.removeAttribute("aria-describedby");
    }
    general.textContent = "";
    general.hidden = true;
  }

  function showError(path, message, named = false) {
    const found = path ? slot(path) : null;
    if (!found) {
      general.textContent = general.textContent ? `${general.textContent}\n${message}` : message;
      general.hidden = false;
      return;
    }
    const target = found.target;
    if (found.rest && !named) message = `${found.rest}: ${message}`; // (a detail names it already)
    target.textContent = target.textContent ? `${target.textContent}; ${message}` : message;
    const input = form.querySelector(`[name="${CSS.escape(target.dataset.errorFor)}"]`);
    if (input) {
      // A screen reader says the message with the field, not only "invalid".
      target.id = target.id || `error-${target.dataset.errorFor.replace(/[^\w-]/g, "_")}`;
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", target.id);
    }
  }

  function read(input) {
    const kind = input.dataset.kind;
    if (kind === "bool") return input.checked;
    const raw = input.value.trim();
    if (raw === "") return undefined;
    // A number that is not one goes as typed: the API's message then says what it wanted. (So does one past
    // what a double holds: 1e400 would be Infinity, which JSON writes as null, swift's default.)
    if (kind === "number") return NUMBER.test(raw) && Number.isFinite(Number(raw)) ? Number(raw) : raw;
    if (kind === "json") {
      const value = JSON.parse(raw); // a SyntaxError is reported against this field
      if (value === null || typeof value !== "object" || Array.isArray(value)) throw new SyntaxError("not an object");
      return value;
    }
    return raw;
  }

  function build() {
    const out = {};
    let bad = false;
    const fields = Array.from(form.querySelectorAll("[data-kind]"));
    // The JSON box first, so that the named training fields win over the same names in it.
    fields.sort((a, b) => (a.dataset.kind === "json" ? -1 : 0) - (b.dataset.kind === "json" ? -1 : 0));
    for (const input of fields) {
      let value;
      try {
        value = read(input);
      } catch (e) {
        showError(input.name, "must be a JSON object, such as {\"eval_steps\": 50}");
        bad = true;
        continue;
      }
      if (value === undefined) continue;
      const path = input.name.split(".");
      let node = out;
      for (const part of path.slice(0, -1)) node = node[part] = node[part] || {};
      const leaf = path[path.length - 1];
      node[leaf] = typeof value === "object" ? Object.assign(node[leaf] || {}, value) : value;
    }
    return bad ? null : out;
  }

  // The same job sent again after its answer was lost (a dropped connection) carries the same Idempotency-Key:
  // the server answers with the job it created, where a retry got "output_dir ... is in use by active job".
  // A new key once the server has answered (it replays 4xx answers too) or the job changes.
  let attempt = null;
  function idempotencyKey(text) {
    if (!attempt || attempt.text !== text) {
      // (crypto.randomUUID needs https or localhost; getRandomValues does not)
      const bytes = crypto.getRandomValues(new Uint8Array(16));
      attempt = { text, key: Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") };
    }
    return attempt.key;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    const body = build();
    if (!body) return;
    submit.disabled = true;
    let created = false; // then the page is on its way to the job's: a second click would post the job again
    try {
      const text = JSON.stringify(body);
      const r = await d.apiJson("/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey(text) },
        body: text,
      });
      if (r.status !== 0 && r.status !== 429 && r.status < 500) attempt = null;
      if (r.status === 201 && r.body && r.body.job_id) {
        created = true;
        location.assign(`${d.root}/ui/jobs/${encodeURIComponent(r.body.job_id)}`);
        return;
      }
      const answer = r.body || {};
      if (Array.isArray(answer.errors) && answer.errors.length) {
        for (const e of answer.errors) {
          const loc = (e.loc || []).filter((p, i) => !(i === 0 && p === "body")).join(".");
          const msg = String(e.msg || "invalid").replace(/^Value error, /, "");
          const match = loc ? null : FIELD_DETAIL.exec(msg); // a check of the whole body names its field
          showError(loc || (match ? match[1] : ""), msg, Boolean(match));
        }
      } else {
        const detail = String(answer.detail || `the server answered ${r.status}`);
        const match = FIELD_DETAIL.exec(detail);
        showError(match ? match[1] : "", detail, true);
      }
      const first = form.querySelector("[aria-invalid]");
      if (first) first.focus();
    } finally {
      submit.disabled = created;
    }
  });
})();
