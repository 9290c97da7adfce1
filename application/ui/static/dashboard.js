/* swift-api dashboard: what every page shares.
 *
 * - The API key: kept in localStorage and sent as `Authorization: Bearer` on every API call (the API reads no
 *   cookie; the HttpOnly cookie set by /ui/login only lets the server render the lists).
 * - stream(): Server-Sent Events read with fetch(), because EventSource cannot send an Authorization header.
 *   It parses id:/event:/data: lines, skips `: keep-alive` comments, reconnects with Last-Event-ID after a
 *   drop and stops at `event: end`.
 * - Live sections: an element with data-refresh is re-fetched from the page's own URL and swapped in, so
 *   the HTML is rendered in one place only (the server).
 * Everything from the server is put into the page with textContent or as server-escaped HTML, never by
 * concatenating strings into innerHTML.
 */
"use strict";

(() => {
  const body = document.body;
  const KEY = "swiftApiKey";
  const root = body.dataset.root || "";
  const api = body.dataset.api || "";
  const keysOn = body.dataset.keys === "true";
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // What a key can be (printable ASCII, no spaces): fetch() throws on a header it cannot send, and every call
  // then failed as if the server did not answer, the 401 that clears a bad key never coming.
  const KEY_CHARS = /^[\x21-\x7e]+$/;

  function key() {
    let k = null;
    try {
      k = localStorage.getItem(KEY);
    } catch (e) {
      return null; // storage disabled: the cookie still lets the lists render
    }
    if (k && !KEY_CHARS.test(k)) {
      setKey(null);
      return null;
    }
    return k;
  }

  function setKey(value) {
    try {
      if (value) localStorage.setItem(KEY, value);
      else localStorage.removeItem(KEY);
    } catch (e) {
      /* nothing to keep it in */
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const k = key();
    if (keysOn && k) h.Authorization = "Bearer " + k;
    return h;
  }

  /**
   * Text as shown: bidi embedding, override and isolate controls (which trainer output and error messages may
   * carry) become U+FFFD, so that they cannot reverse what the page shows after them ("(exit_code)", an actor).
   */
  const plain = (value) =>
    String(value)
      .replace(/\x1b\[[0-?]*[ -/]*[@-~]/g, "") // terminal colours (DeepSpeed's warnings): shown raw before
      .replace(/[\u202A-\u202E\u2066-\u2069]/g, "\uFFFD");

  /** An element with text (never parsed as HTML) and optional attributes and children. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = plain(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  /** Rebuild `box` from build() only when `mark` (what it shows, as text) changed: rebuilt at every refresh, a
   * selection in it (a checkpoint's path, to copy it) was lost every few seconds (hunt DB). */
  function replaceIfChanged(box, mark, build) {
    if (!box || box.dataset.mark === mark) return;
    box.dataset.mark = mark;
    box.replaceChildren(...build());
  }

  // The key this page was opened with changed in another tab (a login as someone else, a logout): its streams
  // end and its refreshes stop, rather than show another owner's lists under this page's name or call this
  // owner's job deleted (hunt DB).
  let keyChanged = false;
  const streams = new Set();
  window.addEventListener("storage", (e) => {
    if (e.key !== KEY && e.key !== null) return;
    if (keyChanged || e.newValue === e.oldValue) return;
    keyChanged = true;
    for (const c of streams) c.abort();
    notice("This browser logged in or out in another tab: this page stopped following.", {
      href: location.href,
      text: "Reload",
    });
  });

  function notice(text, link) {
    const box = document.getElementById("notice");
    if (!box) return;
    if (text === null) {
      box.hidden = true;
      return;
    }
    box.replaceChildren(document.createTextNode(text + " "));
    if (link) box.append(el("a", { href: link.href, text: link.text }));
    box.hidden = false;
  }

  let authNoticed = false;
  function authFailed() {
    setKey(null);
    if (authNoticed) return;
    authNoticed = true;
    // (below the root: the login puts it in front again)
    const here = root && location.pathname.startsWith(root + "/") ? location.pathname.slice(root.length) : location.pathname;
    const next = encodeURIComponent(here + location.search);
    notice("The API refused this browser's key (or it has none).", {
      href: `${root}/ui/login?next=${next}`,
      text: "Log in",
    });
  }

  async function apiFetch(path, opts) {
    const o = Object.assign({ cache: "no-store" }, opts || {});
    o.headers = headers(o.headers);
    const r = await fetch(api + path, o);
    if (r.status === 401) authFailed();
    return r;
  }

  /** {ok, status, body}: body is the JSON answer, or {detail} when the server did not answer. */
  async function apiJson(path, opts) {
    let r;
    try {
      r = await apiFetch(path, opts);
    } catch (e) {
      return { ok: false, status: 0, body: { detail: `the server did not answer (${e.message})` } };
    }
    const text = await r.text();
    let parsed = null;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch (e) {
        parsed = { detail: text };
      }
    }
    return { ok: r.ok, status: r.status, body: parsed };
  }

  /**
   * Follow an SSE endpoint. handlers: onMessage({id, event, data}), onEnd(msg), onState(text), lastId.
   * Returns when the stream ends (event: end), the job is gone (404) or the key is refused (401).
   */
  async function stream(path, handlers) {
    let last = handlers.lastId || null;
    let delay = 500;
    const state = handlers.onState || (() => {});
    const control = new AbortController();
    streams.add(control);
    for (;;) {
      if (keyChanged) {
        state("stopped: the key changed in another tab");
        streams.delete(control);
        return;
      }
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (last) h["Last-Event-ID"] = last;
        const r = await fetch(api + path, { headers: h, cache: "no-store", signal: control.signal });
        if (r.status === 401) {
          authFailed();
          state("not allowed");
          streams.delete(control);
          return;
        }
        if (r.status === 404) {
          state("gone");
          streams.delete(control);
          return;
        }
        if (r.status === 429) {
          // this key holds STREAMS_PER_OWNER streams already (other tabs): try again later
          state("too many open streams, retrying");
          await sleep(delay);
          delay = Math.min(delay * 2, 15000);
          continue;
        }
        if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
        state("live");
        delay = 500;
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        let id = null;
        let event = "";
        let data = [];
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          const lines = buf.split("\n");
          buf = lines.pop(); // an unfinished line waits for the next chunk
          for (let line of lines) {
            if (line.endsWith("\r")) line = line.slice(0, -1);
            if (line === "") {
              if (data.length || event) {
                if (id !== null) last = id;
                const msg = { id, event: event || "message", data: data.join("\n") };
                if (msg.event === "end") {
                  reader.cancel().catch(() => {});
                  streams.delete(control);
                  state("ended");
                  if (handlers.onEnd) handlers.onEnd(msg);
                  return;
                }
                handlers.onMessage(msg);
              }
              id = null;
              event = "";
              data = [];
            } else if (line[0] !== ":") {
              // ":" starts a comment (the server's keep-alive heartbeat)
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              let value = colon < 0 ? "" : line.slice(colon + 1);
              if (value[0] === " ") value = value.slice(1);
              if (field === "data") data.push(value);
              else if (field === "event") event = value;
              else if (field === "id") id = value;
            }
          }
        }
      } catch (e) {
        /* dropped (server restart, network): reconnect below from the last id seen */
      }
      state("reconnecting…");
      await sleep(delay);
      delay = Math.min(delay * 2, 15000);
    }
  }

  /** <time datetime> elements rendered in UTC by the server, shown in the reader's local time. */
  function localTimes(scope) {
    for (const t of (scope || document).querySelectorAll("time[datetime]")) {
      const d = new Date(t.getAttribute("datetime"));
      if (!Number.isNaN(d.getTime())) {
        t.title = t.textContent;
        t.textContent = d.toLocaleString();
      }
    }
  }

  function timeEl(seconds) {
    if (seconds === null || seconds === undefined) return el("span", { class: "muted", text: "—" });
    const d = new Date(seconds * 1000);
    return el("time", { datetime: d.toISOString(), text: d.toLocaleString() });
  }

  function size(n) {
    // As the server's pages write it (ui/html.py `size`): a refreshed cell reads as the rendered one did.
    if (n === null || n === undefined) return "—";
    for (const unit of ["B", "KiB", "MiB", "GiB"]) {
      if (Math.abs(n) < 1024) return unit === "B" ? `${n.toFixed(0)} B` : `${n.toFixed(1)} ${unit}`;
      n /= 1024;
    }
    return `${n.toFixed(1)} TiB`;
  }

  function startRefresh() {
    const parts = document.querySelectorAll("[data-refresh]");
    if (!parts.length) return;
    const every = Math.max(1000, Number(parts[0].dataset.refresh) || 3000);
    let busy = false;
    // A refresh that fails says so, and since when the page has stood still: during a Redis outage the lists
    // showed what they had, GPUs free and all, without a word.
    let staleSince = null;
    const stale = (why) => {
      if (authNoticed) return;
      staleSince = staleSince || new Date();
      notice(`Not up to date: ${why} (showing what it said at ${staleSince.toLocaleTimeString()}); trying again.`);
    };
    const html = new Map(); // each section's HTML as last served: swapped in only when it changed
    let pressed = false; // (a drag under way: a selection being made)
    document.addEventListener("mousedown", (e) => (pressed = e.button === 0));
    // (a right click's menu, a drag out of the window: no mouseup comes, and the lists stood still, review DE)
    for (const type of ["mouseup", "contextmenu", "dragend", "pointercancel"]) {
      document.addEventListener(type, () => (pressed = false));
    }
    window.addEventListener("blur", () => (pressed = false));
    const selecting = (part) => {
      const sel = window.getSelection();
      return pressed || (sel && !sel.isCollapsed && part.contains(sel.anchorNode));
    };
    setInterval(async () => {
      if (busy || document.hidden || keyChanged) return;
      busy = true;
      try {
        const r = await fetch(location.href, { headers: headers({ Accept: "text/html" }), cache: "no-store" });
        if (r.redirected && new URL(r.url).pathname.endsWith("/ui/login")) {
          authFailed();
          return;
        }
        if (!r.ok) {
          stale(`the server answered ${r.status}`);
          return;
        }
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        for (const part of document.querySelectorAll("[data-refresh]")) {
          const fresh = part.id && doc.getElementById(part.id);
          // Not when nothing changed, nor over a selection being made (both lost it every few seconds), and
          // a table scrolled sideways stays so (it went back to its left edge: hunt DB).
          if (fresh && html.get(part.id) !== fresh.outerHTML && !selecting(part)) {
            html.set(part.id, fresh.outerHTML);
            const scrolled = [...part.querySelectorAll(".table-scroll")].map((t) => t.scrollLeft);
            const node = document.importNode(fresh, true);
            localTimes(node);
            part.replaceWith(node);
            node.querySelectorAll(".table-scroll").forEach((t, i) => (t.scrollLeft = scrolled[i] || 0));
            body.dataset.swapped = String(Number(body.dataset.swapped || 0) + 1); // (a test hook)
          }
        }
        body.dataset.refreshed = String(Date.now());
        if (staleSince) {
          staleSince = null;
          const box = document.getElementById("notice");
          if (box && !authNoticed) box.hidden = true;
        }
      } catch (e) {
        stale("the server did not answer"); // the next tick tries again
      } finally {
        busy = false;
      }
    }, every);
  }

  const logout = document.querySelector("[data-logout]");
  if (logout) {
    logout.addEventListener("submit", () => {
      setKey(null);
      // Swagger UI (/docs, this origin) keeps a key authorized there in localStorage: the next person at this
      // browser would call the API with it.
      try {
        localStorage.removeItem("authorized");
      } catch (e) {
        // storage disabled: nothing was kept
      }
    });
  }

  localTimes(document);
  startRefresh();

  window.dashboard = Object.assign(window.dashboard || {}, {
    api,
    root,
    keysOn,
    key,
    setKey,
    el,
    plain,
    replaceIfChanged,
    keyChanged: () => keyChanged,
    authNoticed: () => authNoticed,
    timeEl,
    size,
    notice,
    apiFetch,
    apiJson,
    stream,
    localTimes,
    sleep,
    KEY_CHARS,
  });
})();
