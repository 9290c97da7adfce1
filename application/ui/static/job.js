/* The job page: live loss / eval loss, learning-rate and grad-norm charts (uPlot), the log, the events, and
 * the actions. Start-up: GET .../progress?history_limit=2000 draws the history, then the progress stream
 * continues after its newest point (its `stream_id`), so no point comes twice; a `rewind` drops the points of
 * steps a resumed run logs again.
 * The status, command, attempts and checkpoints are re-read from the API every few seconds; the files the job
 * wrote (GET .../artifacts, which walks its folder) whenever those say something new was written.
 * Test hooks: window.dashboard.lossPoints(), logText(), jobStatus(), jobReads().
 */
"use strict";

(() => {
  const d = window.dashboard;
  const section = document.getElementById("job");
  if (!d || !section) return;
  const el = d.el;
  const jobId = section.dataset.jobId;
  const base = `/jobs/${encodeURIComponent(jobId)}`;
  const TERMINAL = new Set(["completed", "failed", "stopped", "cancelled"]);
  const ENABLED = {
    start: ["pending"],
    stop: ["pending", "queued", "running", "paused"],
    pause: ["running"],
    resume: ["paused", "stopped", "failed"],
    export: ["completed", "stopped", "failed", "paused"],
    delete: ["pending", "queued", "paused", "completed", "failed", "stopped", "cancelled"],
    priority: ["pending", "queued"],
  };
  let status = section.dataset.status;
  let gone = false;
  // The streams end with a run. Once the page has seen its job over (or paused), a new run (a resume, here or
  // from elsewhere) needs them again: the page starts again. Sticky, because any refresh may be the first to
  // see the new run (one already under way when the resume came), so "the status before this refresh" misses it.
  let streamsOver = false;
  let acting = false;
  const over = (s) => TERMINAL.has(s) || s === "paused";
  const newRun = () => streamsOver && !over(status) && !gone;
  // What the server also checks before an action: a running export (it refuses another export and a delete
  // meanwhile; a stop of a finished job stops the export), and the checkpoints (null until the first list):
  // without one there is nothing to export or resume from, unless the job is paused; not known yet, none offered.
  let exporting = false;
  let checkpointCount = null;
  const stopButton = document.querySelector("#actions [data-action=stop]");
  const stopAsServed = stopButton && { label: stopButton.textContent, confirm: stopButton.dataset.confirm };

  // ---- charts ---------------------------------------------------------------------------------------------
  // One row per step; a training and an evaluation point logged at the same step share it.
  const rows = { x: [], loss: [], eval: [], lr: [], grad: [] };
  const FIELDS = { loss: "loss", eval: "eval_loss", lr: "learning_rate", grad: "grad_norm" };
  // PPO logs no loss: its first chart is the reward, one of its point's metrics.
  const REWARD = "objective/rlhf_reward";
  const rewardChart = document.getElementById("chart-loss")?.dataset.series === "reward";
  const value = (p, k) => (k === "loss" && rewardChart ? (p.metrics || {})[REWARD] : p[FIELDS[k]]);
  const charts = [];
  const fmt = (v, digits = 4) =>
    v === null || v === undefined ? "—" : Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(digits - 2) : +v.toPrecision(digits);
  // An axis's labels with as many digits as it takes to tell them apart (a learning rate that moves in its
  // fourth digit read "1.00e-4" at every tick).
  function tickLabels(vals) {
    for (let digits = 3; digits < 9; digits++) {
      const out = vals.map((v) => String(fmt(v, digits)));
      if (new Set(out).size === out.length) return out;
    }
    return vals.map((v) => String(fmt(v, 9)));
  }

  function chart(id, series) {
    const box = document.getElementById(id);
    if (!box || typeof uPlot === "undefined") return;
    const opts = {
      width: Math.max(280, box.clientWidth || 400),
      height: 220,
      scales: { x: { time: false } },
      legend: { live: true },
      series: [{ label: "step" }].concat(
        series.map(([label, color]) => ({ label, stroke: color, width: 1.5, spanGaps: true, value: (u, v) => fmt(v) }))
      ),
      axes: [{ label: "step" }, { size: 72, values: (u, vals) => tickLabels(vals) }],
    };
    const keys = series.map((s) => s[2]);
    const u = new uPlot(opts, [rows.x].concat(keys.map((k) => rows[k])), box);
    charts.push({ u, box, keys });
  }

  let drawQueued = false;
  function redraw() {
    if (drawQueued) return;
    drawQueued = true;
    // A burst of stream messages (a reconnect replays many) draws once.
    setTimeout(() => {
      drawQueued = false;
      for (const c of charts) c.u.setData([rows.x].concat(c.keys.map((k) => rows[k])));
    }, 50);
  }

  function addPoint(p) {
    if (typeof p.step !== "number") return;
    let n = rows.x.length;
    if (n && p.step < rows.x[n - 1]) {
      // A resumed run logs again from its checkpoint's step: what it redoes replaces what was drawn.
      while (n && rows.x[n - 1] >= p.step) n--;
      for (const k of Object.keys(rows)) rows[k].length = n;
    }
    const last = rows.x.length - 1;
    if (last >= 0 && rows.x[last] === p.step) {
      for (const k of Object.keys(FIELDS)) if (value(p, k) !== undefined && value(p, k) !== null) rows[k][last] = value(p, k);
    } else {
      rows.x.push(p.step);
      for (const k of Object.keys(FIELDS)) rows[k].push(value(p, k) === undefined ? null : value(p, k));
    }
    redraw();
  }

  function rewind(step) {
    let n = rows.x.length;
    while (n && rows.x[n - 1] > step) n--;
    for (const k of Object.keys(rows)) rows[k].length = n;
    redraw();
  }

  function showProgress(p) {
    if (!p) return;
    const box = document.getElementById("job-progress");
    const step = p.current_step;
    const total = p.max_steps;
    const bar = el("div", { class: total ? "bar" : "bar empty" });
    if (total) {
      const pct = Math.min(100, Math.max(0, (100 * (step || 0)) / total));
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuenow", pct.toFixed(0));
      bar.append(el("span", { class: "fill", style: `width:${pct.toFixed(1)}%` }));
    }
    bar.append(el("span", { class: "label", text: total ? `${step || 0}/${total}` : step != null ? `step ${step}` : "—" }));
    box.replaceChildren(bar);
    const s = p.remaining_seconds;
    document.getElementById("job-eta").textContent =
      status !== "running" ? "—" : typeof s === "number" ? duration(s) : p.remaining_time || "—";
    // null: the step's loss was not a number (NaN, inf): not the last good one shown on as if it were this step's
    if (p.loss !== undefined) document.getElementById("job-loss").textContent = p.loss === null ? "—" : fmt(p.loss);
  }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    return m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
  }

  const chartsState = document.getElementById("charts-state");

  async function followProgress() {
    const r = await d.apiJson(`${base}/progress?history_limit=2000`);
    let lastId = null;
    if (r.ok) {
      for (const p of r.body.history || []) addPoint(p);
      lastId = r.body.stream_id || null;
      showProgress(r.body.progress);
    }
    await d.stream(`${base}/progress/stream`, {
      lastId,
      onMessage: (m) => {
        if (m.event === "status") return; // (the page's header shows the status: refreshed with the job)
        if (m.event === "rewind") {
          // a resumed run logs these steps again: what was drawn for them goes
          rewind(JSON.parse(m.data).step);
          return;
        }
        const p = JSON.parse(m.data);
        addPoint(p);
        showProgress(p.progress);
      },
      onEnd: (m) => {
        showProgress(JSON.parse(m.data).progress);
        refreshJob();
      },
      // (the header's progress also comes with each refresh of the job: it does not wait for this stream)
      onState: (s) => (chartsState.textContent = s && s !== "live" && s !== "ended" ? `charts: ${s}` : ""),
    });
  }

  // ---- log ------------------------------------------------------------------------------------------------
  const log = document.getElementById("log");
  const follow = document.getElementById("log-follow");
  const logState = document.getElementById("log-state");
  const MAX_LINES = 5000; // the DOM keeps the tail; GET .../logs?limit= has the rest
  let pending = [];

  function flushLog() {
    if (!pending.length) return;
    // (as the error box and events show text: bidi controls cannot reorder the line, escape codes are dropped)
    log.append(...pending.map((line) => d.plain(line) + "\n"));
    pending = [];
    while (log.childNodes.length > MAX_LINES) log.firstChild.remove();
    if (follow.checked) log.scrollTop = log.scrollHeight;
  }

  function logLine(line) {
    // Many lines arrive in one chunk: append them together once the chunk is parsed.
    if (!pending.length) Promise.resolve().then(flushLog);
    pending.push(line);
  }

  function followLog() {
    // The last lines of a long log, not all of it: a run's log reaches hundreds of megabytes.
    return d.stream(`${base}/logs/stream?tail=${MAX_LINES}`, {
      onMessage: (m) => {
        if (m.event !== "status") logLine(m.data);
      },
      onEnd: (m) => logLine(`── end of log (${JSON.parse(m.data).status}) ──`),
      onState: (s) => (logState.textContent = s),
    });
  }

  // ---- events ---------------------------------------------------------------------------------------------
  const events = document.getElementById("events");

  function eventItem(e) {
    return el("li", { "data-event": e.id }, d.timeEl(e.time), " ", el("span", { class: "ev-type", text: e.type }), " ",
      document.createTextNode(d.plain(e.message || "")), " ", el("span", { class: "muted", text: e.actor || "" }));
  }

  async function followEvents() {
    const all = [];
    let after = null;
    // Older events dropped (EVENTS_MAX_PER_JOB keeps the newest) are said so, not silently missing.
    const dropped = (message) => el("li", { class: "muted", "data-dropped": "", text: message });
    for (let page = 0; page < 20; page++) {
      const r = await d.apiJson(`${base}/events?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      if (!r.ok) break;
      if (r.body.dropped_before) all.push({ dropped: `older events were dropped: the oldest kept is ${r.body.dropped_before}` });
      all.push(...r.body.events);
      after = r.body.next_after;
      if (!after) break;
    }
    if (all.length) events.replaceChildren(...all.map((e) => (e.dropped ? dropped(e.dropped) : eventItem(e))));
    const shown = all.filter((e) => !e.dropped);
    const last = shown.length ? shown[shown.length - 1].id : events.lastElementChild && events.lastElementChild.dataset.event;
    await d.stream(`${base}/events/stream`, {
      lastId: last || null,
      onMessage: (m) => {
        if (m.event === "dropped") {
          events.append(dropped(JSON.parse(m.data).message));
          return;
        }
        events.append(eventItem(JSON.parse(m.data)));
        refreshJob();
      },
    });
  }

  // ---- the job's facts, attempts, checkpoints ------------------------------------------------------------
  function setStatus(s) {
    status = s;
    if (over(s)) streamsOver = true;
    section.dataset.status = s;
    const badge = section.querySelector("[data-status]");
    badge.textContent = s;
    badge.className = `badge s-${s}`;
    // While an action is under way none is offered: a read begun before it would offer its button again.
    for (const b of document.querySelectorAll("#actions [data-action]")) {
      b.disabled = gone || acting || !allowed(b.dataset.action, s);
    }
    document.getElementById("priority-input").disabled = gone || acting || !ENABLED.priority.includes(s);
    if (stopButton) {
      const stopsExport = exporting && TERMINAL.has(s);
      stopButton.textContent = stopsExport ? "Stop export" : stopAsServed.label;
      stopButton.dataset.confirm = stopsExport
        ? `Stop the running export of job ${jobId}? The job itself stays ${s}.`
        : stopAsServed.confirm;
    }
  }

  function allowed(action, s) {
    if (exporting && (action === "export" || action === "delete")) return false;
    if (exporting && action === "stop" && TERMINAL.has(s)) return true;
    const noCheckpoint = !checkpointCount;
    if (noCheckpoint && (action === "export" || (action === "resume" && s !== "paused"))) return false;
    return ENABLED[action].includes(s);
  }

  function fact(name, ...nodes) {
    const dd = section.querySelector(`[data-fact="${name}"]`);
    if (dd) dd.replaceChildren(...nodes);
  }

  function grid(id, headers, rows, empty) {
    const head = el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })));
    const body = rows.length
      ? rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))
      : [el("tr", {}, el("td", { colspan: headers.length, class: "muted", text: empty }))];
    const table = el("table", { class: "grid", id }, el("thead", {}, head), el("tbody", {}, ...body));
    return el("div", { class: "table-scroll" }, table); // (as html.table renders them)
  }

  const code = (t) => (t ? el("code", { text: t }) : el("span", { class: "muted", text: "—" }));
  const text = (t) => document.createTextNode(t === null || t === undefined ? "" : d.plain(t));

  function showJob(job) {
    exporting = (job.export || {}).status === "running";
    setStatus(job.status);
    showProgress(job.progress);
    const err = document.getElementById("job-error");
    err.textContent = job.error_message ? `${d.plain(job.error_message)}${job.error_code ? ` (${job.error_code})` : ""}` : "";
    err.hidden = !job.error_message;
    // Written only when it changed: rewritten at each refresh, a selection in it (to copy it) was lost (hunt DB).
    const command = document.getElementById("command");
    if (command.textContent !== (job.command_line || "—")) command.textContent = job.command_line || "—";
    fact("priority", text(job.priority));
    const ids = (job.gpu_ids || []).map((i) => `#${i}`).join(", ") || (job.num_gpus === 0 ? "CPU" : "—");
    fact("gpus", text(`${job.num_gpus} asked · ${ids}`));
    fact("started", d.timeEl(job.started_at));
    fact("finished", d.timeEl(job.finished_at));
    const ex = job.export || {};
    fact("export", text(ex.status || "none"), ...(ex.path ? [text(" · "), code(ex.path)] : []));
    const input = document.getElementById("priority-input");
    if (document.activeElement !== input) input.value = job.priority;
    const attempts = (job.attempts || []).map((a) => [
      text(a.number), d.timeEl(a.started_at), d.timeEl(a.finished_at), text(a.outcome || "running"),
      text(`${a.first_step || 0}–${a.last_step === null || a.last_step === undefined ? "" : a.last_step}`),
      code(a.resumed_from), text(a.error_message || ""),
    ]);
    d.replaceIfChanged(document.getElementById("attempts-box"), JSON.stringify(job.attempts || []), () => [
      grid("attempts", ["#", "Started", "Ended", "Outcome", "Steps", "Resumed from", "Error"], attempts, "No run yet."),
    ]);
  }

  function showCheckpoints(list) {
    const rowsOut = (list.checkpoints || []).map((c) => [
      text(c.step), code(c.path), d.timeEl(c.time), text(fmt(c.loss)),
      text(c.size_bytes == null ? "—" : d.size(c.size_bytes)),
      text([c.resume && "resume", c.exported && "exported", c.complete === false && "incomplete"].filter(Boolean).join(" ")),
    ]);
    const shown = (list.checkpoints || []).length;
    const more = list.total > shown ? [el("p", { class: "muted", text: `the newest ${shown} of ${list.total}` })] : [];
    d.replaceIfChanged(document.getElementById("checkpoints-box"), JSON.stringify(list), () => [
      grid("checkpoints", ["Step", "Path", "Written", "Loss", "Size", ""], rowsOut, "No checkpoint yet."), ...more,
    ]);
    checkpointCount = Math.max(list.total || 0, shown);
    setStatus(status);
  }

  // As job_view.files_table renders them: folders as tar first, then the files outside checkpoint folders.
  const FILES_SHOWN = 200;
  function showFiles(listing) {
    const href = (p) => `${d.root}/ui${base}/files/${p.split("/").map(encodeURIComponent).join("/")}`;
    const link = (p) => el("a", { href: href(p), download: "", text: p });
    const rowsOut = [
      ...(listing.folders || []).map((f) => [link(f.tar), text(f.kind), text(d.size(f.size))]),
      ...(listing.files || [])
        .filter((f) => f.kind !== "checkpoint" && f.kind !== "merged")
        .map((f) => [link(f.path), text(f.kind), text(d.size(f.size))]),
    ];
    const more = rowsOut.length - FILES_SHOWN;
    const note = more > 0 ? [el("p", { class: "muted small", text: `and ${more} more: GET .../artifacts lists them all.` })] : [];
    document.getElementById("files-box").replaceChildren(
      grid("files", ["File or folder", "Kind", "Size"], rowsOut.slice(0, FILES_SHOWN), "Nothing written yet."), ...note
    );
  }
  // What says the job wrote something new (a run began or ended, a checkpoint, an export): the files are read
  // again only then. The page's own render is the first.
  let filesSeen = null;
  function filesMark(job, checkpoints) {
    const ex = job.export || {};
    return JSON.stringify([job.status, (job.attempts || []).length, checkpoints.total, ex.status, ex.path]);
  }

  let refreshing = null;
  let staleSince = null;
  let jobReads = 0;
  function refreshJob() {
    // Calls that come while one is under way share it.
    if (!refreshing) {
      refreshing = (async () => {
        const r = await d.apiJson(base);
        if (r.status === 404) {
          gone = true;
          // The page polls no more: a notice that it stands still would stand for good (hunt ET).
          if (staleSince && !d.authNoticed()) d.notice(null);
          staleSince = null;
          // (or this browser's key is another owner's now: logged in as someone else in another tab)
          setStatus(d.keyChanged() ? "not visible" : "deleted");
          return;
        }
        if (!r.ok) {
          // The page says it stands still, as the lists do: status, progress and actions are as last read. (Not
          // over the notice that says to log in again, which a refused key shows.)
          if (r.status === 401 || d.authNoticed()) return;
          staleSince = staleSince || new Date();
          d.notice(`Not up to date: ${r.body?.detail || `the server answered ${r.status}`} (showing what it said at ${staleSince.toLocaleTimeString()}); trying again.`);
          return;
        }
        if (staleSince && !d.authNoticed()) d.notice(null); // (only the notice this showed)
        staleSince = null;
        showJob(r.body);
        jobReads += 1;
        const c = await d.apiJson(`${base}/checkpoints`);
        if (!c.ok) return;
        showCheckpoints(c.body);
        const mark = filesMark(r.body, c.body);
        if (filesSeen !== null && mark !== filesSeen) {
          const f = await d.apiJson(`${base}/artifacts`);
          if (f.ok) showFiles(f.body);
          else return; // read again at the next refresh
        }
        filesSeen = mark;
      })().finally(() => (refreshing = null));
    }
    return refreshing;
  }
  // After an action: a read already under way may have read the job before the action was answered (a resume
  // seen as still stopped would not start the page again), so one that starts after it.
  async function refreshAfter() {
    if (refreshing) await refreshing;
    return refreshJob();
  }

  // ---- actions --------------------------------------------------------------------------------------------
  const result = document.getElementById("action-result");

  async function act(action) {
    const json = { "Content-Type": "application/json" };
    if (action === "delete") return d.apiJson(base, { method: "DELETE" });
    if (action === "priority") {
      // (empty, or what the number input could not read, is "": Number("") would send priority 0)
      const raw = document.getElementById("priority-input").value.trim();
      if (!/^\d{1,2}$/.test(raw)) return { ok: false, status: 0, body: { detail: "priority: give a whole number from 0 to 10" } };
      return d.apiJson(base, { method: "PATCH", headers: json, body: JSON.stringify({ priority: Number(raw) }) });
    }
    return d.apiJson(`${base}/${action}`, { method: "POST" });
  }

  document.getElementById("actions").addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button || button.disabled || !window.confirm(button.dataset.confirm)) return;
    const action = button.dataset.action;
    button.disabled = true;
    result.className = "small";
    result.textContent = `${action}…`;
    acting = true; // the periodic refresh leaves the reload to this handler, which keeps the answer across it
    try {
      const r = await act(action);
      const body = r.body || {};
      result.className = r.ok ? "small ok" : "small error";
      result.textContent = r.ok ? body.message || `${action}: done` : body.detail || `the server answered ${r.status}`;
      if (r.ok && action === "delete") {
        gone = true; // nothing is offered while the list loads (a second click got a 404)
        location.assign(`${d.root}/ui/jobs`);
        return;
      }
      await refreshAfter();
      if (newRun()) {
        sessionStorage.setItem(SAID, result.textContent);
        location.reload();
      }
    } finally {
      acting = false;
      setStatus(status);
    }
  });
  const SAID = `swift-api:action-result:${jobId}`;
  if (sessionStorage.getItem(SAID)) {
    result.className = "small ok";
    result.textContent = sessionStorage.getItem(SAID);
    sessionStorage.removeItem(SAID);
  }

  // ---- start ----------------------------------------------------------------------------------------------
  chart("chart-loss", rewardChart ? [["reward", "#2563eb", "loss"]] : [["loss", "#2563eb", "loss"], ["eval_loss", "#dc2626", "eval"]]);
  chart("chart-lr", [["learning rate", "#059669", "lr"]]);
  chart("chart-grad", [["grad norm", "#d97706", "grad"]]);
  window.addEventListener("resize", () => {
    for (const c of charts) c.u.setSize({ width: Math.max(280, c.box.clientWidth), height: 220 });
  });
  setStatus(status);
  followProgress();
  followLog();
  followEvents();
  refreshJob();
  setInterval(async () => {
    if (document.hidden || gone || acting) return;
    await refreshJob();
    // Resumed from elsewhere (the API, another tab): the page starts again, as after its own resume.
    if (newRun() && !acting) location.reload();
  }, 3000);

  Object.assign(d, {
    tickLabels,
    lossPoints: () => rows.loss.filter((v) => v !== null && v !== undefined).length,
    lrPoints: () => rows.lr.filter((v) => v !== null && v !== undefined).length,
    chartPoints: () => rows.x.length,
    logText: () => log.textContent,
    jobStatus: () => status,
    jobReads: () => jobReads,
  });
})();
