// The playground: chat with a served model through the gateway, streaming. The API key, the settings and the
// conversations live in this browser's local storage only. Each refusal is shown as what it means.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const KEY = "cxygpt.apiKey", SETTINGS = "cxygpt.settings", CONVERSATIONS = "cxygpt.conversations";
  const MAX_CONVERSATIONS = 50, MAX_MESSAGES = 200, COUNT_DELAY_MS = 350;
  const els = {
    model: $("model"), messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    count: $("token-count"), refusal: $("refusal"), limits: $("limits-line"), status: $("chat-status"),
    list: $("conversation-list"), drawer: $("settings"), toggle: $("settings-toggle"), key: $("api-key"),
    system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  };
  let conversations = load(CONVERSATIONS, []);
  let current = conversations[0] || null;
  let settings = load(SETTINGS, {});
  let limits = null, counter = null, countTimer = null, streaming = null, countdown = null;

  function load(name, fallback) {
    try { return JSON.parse(localStorage.getItem(name)) ?? fallback; } catch (e) { return fallback; }
  }
  function save(name, value) {
    for (;;) {
      try { localStorage.setItem(name, JSON.stringify(value)); return; } catch (e) {
        // the browser's storage is full: the oldest conversation makes room
        if (name !== CONVERSATIONS || conversations.length <= 1) return;
        conversations.pop();
        value = conversations;
      }
    }
  }
  function headers(json) {
    const h = json ? {"Content-Type": "application/json"} : {};
    const key = localStorage.getItem(KEY);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // ------------------------------------------------------------------ settings drawer
  function openDrawer(open) {
    els.drawer.hidden = !open;
    els.toggle.setAttribute("aria-expanded", String(open));
    (open ? els.key : els.toggle).focus();
  }
  els.toggle.addEventListener("click", () => openDrawer(els.drawer.hidden));
  $("settings-close").addEventListener("click", () => openDrawer(false));
  $("settings-form").addEventListener("submit", e => { e.preventDefault(); openDrawer(false); });
  els.drawer.addEventListener("keydown", e => { if (e.key === "Escape") openDrawer(false); });
  els.key.value = localStorage.getItem(KEY) || "";
  els.system.value = settings.system || "";
  els.temperature.value = settings.temperature ?? "";
  els.topP.value = settings.top_p ?? "";
  els.maxTokens.value = settings.max_tokens ?? "";
  els.key.addEventListener("change", () => {
    const key = els.key.value.trim();
    if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
    loadModels();
  });
  for (const [el, name] of [[els.system, "system"], [els.temperature, "temperature"], [els.topP, "top_p"],
                            [els.maxTokens, "max_tokens"]]) {
    el.addEventListener("input", () => {
      settings[name] = el.value === "" ? undefined : (el.type === "number" ? Number(el.value) : el.value);
      save(SETTINGS, settings);
      if (name === "system") scheduleCount();
    });
  }

  // ------------------------------------------------------------------ conversations
  function newConversation() {
    current = {id: String(Date.now()), title: "New conversation", messages: [], updated: Date.now()};
    conversations.unshift(current);
    conversations = conversations.slice(0, MAX_CONVERSATIONS);
    save(CONVERSATIONS, conversations);
    render();
    els.prompt.focus();
  }
  function renderList() {
    els.list.replaceChildren(...conversations.map(c => {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "link conversation";
      open.textContent = c.title;
      if (c === current) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => { current = c; render(); });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "link remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Delete conversation ${c.title}`);
      remove.addEventListener("click", () => {
        conversations = conversations.filter(x => x !== c);
        if (current === c) current = conversations[0] || null;
        save(CONVERSATIONS, conversations);
        render();
      });
      li.append(open, remove);
      return li;
    }));
  }
  function bubble(role, text) {
    const li = document.createElement("li");
    li.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    els.messages.append(li);
    return body;
  }
  function render() {
    renderList();
    els.messages.replaceChildren();
    for (const m of (current ? current.messages : [])) bubble(m.role, m.content);
    els.messages.scrollTop = els.messages.scrollHeight;
    scheduleCount();
  }
  $("new-chat").addEventListener("click", newConversation);

  // ------------------------------------------------------------------ models and their limits
  async function loadModels() {
    let answer;
    try {
      answer = await fetch("/gateway/v1/models", {headers: headers(false)});
    } catch (e) { return refuse(0, {message: "the console cannot be reached"}, null); }
    if (!answer.ok) return refuse(answer.status, await errorOf(answer), answer.headers.get("Retry-After"));
    const data = (await answer.json()).data || [];
    els.model.replaceChildren(...data.map(m => new Option(
      m.state && m.state !== "ready" ? `${m.id} (${m.state.replaceAll("_", " ")})` : m.id, m.id, false,
      m.id === settings.model)));
    if (!data.length) els.limits.textContent = "The gateway serves no model right now.";
    await loadLimits();
  }
  async function loadLimits() {
    limits = null;
    const model = els.model.value;
    if (!model) return;
    const answer = await fetch(`/gateway/v1/limits?model=${encodeURIComponent(model)}`, {headers: headers(false)});
    if (!answer.ok) { els.limits.textContent = ""; return; }
    const data = await answer.json();
    limits = data.models[model];
    const parts = [`Input up to ${limits.max_input_tokens} tokens`,
                   `answers up to ${limits.output_cap_now} tokens` + (limits.degraded ? " (degraded)" : "")];
    parts.push(limits.rate_qps == null && limits.rate_tpm == null ? "no rate limit"
               : `${limits.rate_qps} req/s and ${limits.rate_tpm} tokens/min for everyone`);
    if (data.key && data.key.id !== "anonymous") parts.push(`your key: ${data.key.id} (${data.key.tier})`);
    els.limits.textContent = parts.join(" · ");
    scheduleCount();
  }
  els.model.addEventListener("change", () => { settings.model = els.model.value; save(SETTINGS, settings); loadLimits(); });

  // ------------------------------------------------------------------ counting the input before it is sent
  function outgoing(prompt) {
    const messages = [];
    if (els.system.value.trim()) messages.push({role: "system", content: els.system.value});
    for (const m of (current ? current.messages : [])) messages.push({role: m.role, content: m.content});
    if (prompt) messages.push({role: "user", content: prompt});
    return messages;
  }
  function scheduleCount() {
    clearTimeout(countTimer);
    countTimer = setTimeout(count, COUNT_DELAY_MS);
  }
  async function count() {
    if (counter) counter.abort();
    const prompt = els.prompt.value;
    if (!els.model.value || !prompt.trim()) { els.count.textContent = ""; return; }
    counter = new AbortController();
    try {
      const answer = await fetch("/api/tokenize", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({model: els.model.value, messages: outgoing(prompt)}), signal: counter.signal});
      const data = await answer.json();
      if (!answer.ok) { els.count.textContent = `Tokens not counted: ${data.error.message}`; return; }
      // the limit read with the user's own key is the one in force for them; the console's is the fallback
      const limit = limits ? limits.max_input_tokens : data.max_input_tokens;
      data.max_input_tokens = limit;
      data.over_by = limit == null ? 0 : Math.max(0, data.count - limit);
      els.count.className = "token-count" + (data.over_by ? " over" : "");
      els.count.textContent = data.over_by
        ? `${data.count} input tokens: over the limit of ${data.max_input_tokens} by ${data.over_by}. ` +
          `The gateway will refuse it (413): shorten it by ${data.over_by} tokens or start a new conversation.`
        : `${data.count} of ${data.max_input_tokens} input tokens`;
    } catch (e) {
      if (e.name !== "AbortError") els.count.textContent = "Tokens not counted: the console cannot be reached.";
    }
  }
  els.prompt.addEventListener("input", scheduleCount);

  // ------------------------------------------------------------------ refusals, in words
  async function errorOf(answer) {
    try { return (await answer.json()).error || {}; } catch (e) { return {message: `${answer.status}`}; }
  }
  function refuse(status, error, retryAfter) {
    clearInterval(countdown);
    const message = error.message || "";
    const box = els.refusal;
    box.hidden = false;
    box.replaceChildren();
    const title = document.createElement("strong");
    const text = document.createElement("p");
    box.append(title, text);
    if (status === 413) {
      const m = /input is (\d+) tokens, over the limit of (\d+) tokens/.exec(message);
      title.textContent = "Too long for this model.";
      text.textContent = m
        ? `This conversation is ${m[1]} tokens and the model takes at most ${m[2]}: ` +
          `shorten it by ${m[1] - m[2]} tokens, or start a new conversation.`
        : message;
    } else if ((status === 429 || status === 503) && retryAfter) {
      title.textContent = status === 429 ? "Rate limited." : "The model is busy.";
      text.textContent = message;
      const wait = document.createElement("p");
      wait.className = "countdown";
      box.append(wait);
      let left = Math.max(1, Math.ceil(Number(retryAfter)));
      els.send.disabled = true;
      const tick = () => {
        if (left <= 0) {
          clearInterval(countdown);
          wait.textContent = "You can send again now.";
          els.send.disabled = false;
          els.status.textContent = "You can send again now.";
          return;
        }
        wait.textContent = `Retry in ${left} s.`;
        left -= 1;
      };
      tick();
      countdown = setInterval(tick, 1000);
    } else if (status === 401) {
      title.textContent = "The gateway wants an API key.";
      text.textContent = `${message}. Set your key in Settings.`;
    } else if (status === 404) {
      title.textContent = "This model is not served.";
      text.textContent = message;
    } else {
      title.textContent = status ? `Refused (${status}).` : "Not sent.";
      text.textContent = message;
    }
  }
  function clearRefusal() {
    clearInterval(countdown);
    els.refusal.hidden = true;
    els.send.disabled = false;
  }

  // ------------------------------------------------------------------ sending and streaming
  async function send(event) {
    event.preventDefault();
    const prompt = els.prompt.value;
    if (!prompt.trim() || streaming || els.send.disabled) return;
    if (!current) newConversation();
    clearRefusal();
    const body = {model: els.model.value, messages: outgoing(prompt), stream: true};
    for (const name of ["temperature", "top_p", "max_tokens"]) if (settings[name] !== undefined) body[name] = settings[name];
    streaming = new AbortController();
    els.stop.hidden = false;
    els.send.disabled = true;
    els.status.textContent = "Sending…";
    let answer;
    try {
      answer = await fetch("/gateway/v1/chat/completions", {method: "POST", headers: headers(true),
        body: JSON.stringify(body), signal: streaming.signal});
    } catch (e) {
      finish();
      return refuse(0, {message: e.name === "AbortError" ? "stopped" : "the console cannot be reached"}, null);
    }
    if (!answer.ok) {
      finish();
      return refuse(answer.status, await errorOf(answer), answer.headers.get("Retry-After"));
    }
    // accepted: the message joins the conversation and the answer streams into its own bubble
    current.messages.push({role: "user", content: prompt});
    if (current.messages.length === 1) current.title = prompt.slice(0, 40);
    bubble("user", prompt);
    els.prompt.value = "";
    els.count.textContent = "";
    const out = bubble("assistant", "");
    out.parentElement.setAttribute("aria-busy", "true");
    let text = "", ended = false;
    try {
      const reader = answer.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { ended = true; continue; }
          const chunk = JSON.parse(data);
          if (chunk.error) { refuse(chunk.error.code === "rate_limit_exceeded" ? 429 : 0, chunk.error, null); continue; }
          for (const choice of chunk.choices || []) text += (choice.delta && choice.delta.content) || "";
          out.textContent = text;
          els.messages.scrollTop = els.messages.scrollHeight;
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") refuse(0, {message: "the answer broke off"}, null);
    }
    if (!ended) text += streaming.signal.aborted ? " [stopped]" : "";
    out.textContent = text;
    out.parentElement.removeAttribute("aria-busy");
    current.messages.push({role: "assistant", content: text});
    current.messages = current.messages.slice(-MAX_MESSAGES);
    current.updated = Date.now();
    save(CONVERSATIONS, conversations);
    renderList();
    finish();
    els.status.textContent = "Answer complete.";
  }
  function finish() {
    streaming = null;
    els.stop.hidden = true;
    els.send.disabled = false;
  }
  els.stop.addEventListener("click", () => { if (streaming) streaming.abort(); });
  $("composer").addEventListener("submit", send);
  els.prompt.addEventListener("keydown", e => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
  });

  render();
  loadModels();
})();
