/* The customer chat page: speaks the websocket protocol of DESIGN.md ("Websocket chat protocol").
 *
 * Plain ES2017, no build step. Everything the model or the server says is put on the page with
 * textContent, never innerHTML: an answer containing markup is shown as text.
 * The page's strings come translated from the template (#chat-strings data attributes), its
 * settings and a reloaded conversation's history from #chat-config (json_script).
 */
(function () {
  "use strict";

  var STORAGE_KEY = "csplatform.chat.conversation";
  var TOKEN_KEY = "csplatform.widget.token"; // the widget's identity (config.widgetToken, chat/widget.py)
  var RECONNECT_MAX_MS = 30000;

  var config = JSON.parse(document.getElementById("chat-config").textContent);
  var strings = document.getElementById("chat-strings").dataset;
  var ui = {
    status: document.getElementById("chat-status"),
    log: document.getElementById("chat-log"),
    empty: document.getElementById("chat-empty"),
    notice: document.getElementById("chat-notice"),
    form: document.getElementById("chat-form"),
    input: document.getElementById("chat-input"),
    send: document.getElementById("chat-send"),
    stop: document.getElementById("chat-stop"),
    newConversation: document.getElementById("chat-new"),
    person: document.getElementById("chat-person"),
    handoff: document.getElementById("chat-handoff"),
    handoffText: document.getElementById("chat-handoff-text"),
    csat: document.getElementById("chat-csat"),
  };

  var socket = null;
  var conversation = null; // the id the server returned in `start`
  var pending = null; // {text, bubble, retried, stopRequested}: sent, no `start` yet
  var streaming = null; // {id, row, textNode, text}: the answer being streamed
  var reconnectAttempts = 0;
  var reconnectTimer = null;
  var countdownTimer = null;
  var busyTimer = null;
  var handoffState = config.state || "bot"; // bot, waiting, agent or closed (chat.handoff)

  function format(template, values) {
    return template.replace(/%\((\w+)\)s/g, function (match, key) {
      return Object.prototype.hasOwnProperty.call(values, key) ? String(values[key]) : match;
    });
  }

  function seconds(ms) {
    return (ms / 1000).toFixed(2);
  }

  // --- the conversation id: kept per tab, and in the URL so that a reload shows the history ---

  function rememberConversation(id) {
    conversation = id;
    try {
      if (id) sessionStorage.setItem(STORAGE_KEY, id);
      else sessionStorage.removeItem(STORAGE_KEY);
    } catch (e) {
      // Storage may be disabled (private modes): the conversation still works until a reload.
    }
    var url = new URL(location.href);
    if (id) url.searchParams.set("conversation", id);
    else url.searchParams.delete("conversation");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  function storedConversation() {
    try {
      return sessionStorage.getItem(STORAGE_KEY);
    } catch (e) {
      return null;
    }
  }

  /* The widget's frame: the token the page was served with, or the one this browser keeps for the
   * embedding site (localStorage, which browsers partition by the top-level site). Returns the
   * address to load instead when the kept one was not the one presented, else null. */
  function widgetReload() {
    var kept = null;
    try {
      kept = localStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null; // storage disabled: this page's token lasts until a reload
    }
    var url = new URL(location.href);
    if (kept && kept !== config.widgetToken && !url.searchParams.has("token")) {
      url.searchParams.set("token", kept);
      if (!url.searchParams.get("conversation") && storedConversation()) url.searchParams.set("conversation", storedConversation());
      return url.toString();
    }
    try {
      localStorage.setItem(TOKEN_KEY, config.widgetToken); // the kept token, or a new one if the server refused it
    } catch (e) {
      // as above
    }
    return null;
  }

  // --- rendering (textContent only) ---

  function nearBottom() {
    return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
  }

  function scrollDown(force) {
    if (force || nearBottom()) ui.log.scrollTop = ui.log.scrollHeight;
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function appendRow(row) {
    var follow = nearBottom();
    ui.empty.hidden = true;
    ui.log.appendChild(row);
    scrollDown(follow);
    return row;
  }

  function appendQuestion(text) {
    var row = element("div", "msg msg-user");
    row.appendChild(element("span", "visually-hidden", strings.you + ": "));
    row.appendChild(element("div", "msg-bubble", text));
    return appendRow(row);
  }

  function appendNote(text, kind) {
    return appendRow(element("div", "msg msg-note" + (kind ? " msg-note-" + kind : ""), text));
  }

  function appendAnswer(id) {
    var row = element("div", "msg msg-bot streaming");
    row.setAttribute("aria-busy", "true"); // screen readers read the answer once, when complete
    if (id !== undefined && id !== null) row.dataset.messageId = String(id);
    row.appendChild(element("span", "visually-hidden", strings.assistant + ": "));
    var bubble = element("div", "msg-bubble");
    var text = element("span", "msg-text");
    bubble.appendChild(text);
    row.appendChild(bubble);
    row.appendChild(element("div", "msg-meta"));
    appendRow(row);
    return { id: id, row: row, textNode: text, text: "" };
  }

  function appendAgent(text) {
    var row = element("div", "msg msg-agent");
    row.appendChild(element("span", "msg-author", strings.agent));
    row.appendChild(element("div", "msg-bubble", text));
    return appendRow(row);
  }

  /* The handoff banner: who answers now; after closing, the 1-5 satisfaction buttons. */
  function showHandoff(state) {
    handoffState = state || "bot";
    var key = { waiting: "stateWaiting", agent: "stateAgent", closed: "stateClosed", bot: "stateBot" }[handoffState];
    ui.handoff.dataset.state = handoffState;
    ui.handoffText.textContent = key ? strings[key] : "";
    ui.handoff.hidden = !key || (handoffState === "bot" && !ui.handoff.dataset.shown);
    if (handoffState !== "bot") ui.handoff.dataset.shown = "1";
    ui.csat.hidden = handoffState !== "closed";
    ui.person.hidden = handoffState === "waiting" || handoffState === "agent";
  }

  function renderToken(answer, piece) {
    var follow = nearBottom();
    answer.text += piece;
    answer.textNode.textContent = answer.text;
    scrollDown(follow);
  }

  /* Close an answer: its response time, or why it ended, and the 👍/👎 buttons. */
  function finishAnswer(answer, info) {
    var follow = nearBottom();
    var row = answer.row;
    row.classList.remove("streaming");
    row.removeAttribute("aria-busy");
    row.dataset.state = info.state || "done";
    var meta = row.querySelector(".msg-meta");
    if (info.state === "stopped") meta.appendChild(element("span", "msg-flag", strings.stopped));
    if (info.state === "interrupted") meta.appendChild(element("span", "msg-flag", strings.interrupted));
    if (typeof info.latency_ms === "number") {
      var label =
        typeof info.first_token_ms === "number"
          ? format(strings.responseTime, { total: seconds(info.latency_ms), first: seconds(info.first_token_ms) })
          : format(strings.responseTimeOnly, { total: seconds(info.latency_ms) });
      meta.appendChild(element("span", "msg-time", label));
    }
    (info.cited || []).forEach(function (question) {
      if (typeof question === "string" && question) meta.appendChild(element("span", "msg-source", format(strings.source, { question: question })));
    });
    if (info.handoffOffered && handoffState === "bot") {
      // The knowledge base had no answer: offer a person right under the reply.
      var offer = element("button", "msg-handoff", strings.offerPerson);
      offer.type = "button";
      offer.addEventListener("click", function () {
        if (!send({ type: "handoff", conversation: conversation })) showNotice(strings.offlineSend);
        offer.disabled = true;
      });
      meta.appendChild(offer);
    }
    var offered = (info.suggestions || []).filter(function (suggestion) {
      return suggestion && typeof suggestion.question === "string" && suggestion.question;
    });
    if (offered.length && handoffState === "bot") {
      // Close, but not sure which: the curated questions that came close, each asked in one click.
      var list = element("span", "msg-suggestions", strings.suggestions);
      offered.forEach(function (suggestion) {
        var ask = element("button", "msg-suggestion", suggestion.question);
        ask.type = "button";
        ask.addEventListener("click", function () {
          if (pending || streaming) return;
          ui.input.value = suggestion.question;
          sendQuestion();
          if (pending) ask.disabled = true; // sent (offline, it stays in the input to send again)
        });
        list.appendChild(ask);
      });
      meta.appendChild(list);
    }
    if (answer.id !== undefined && answer.id !== null && answer.text) {
      var rating = element("span", "msg-rating");
      rating.appendChild(ratingButton(answer.id, 1, "👍", strings.helpful));
      rating.appendChild(ratingButton(answer.id, -1, "👎", strings.notHelpful));
      meta.appendChild(rating);
      if (info.rating) showRating(answer.id, info.rating);
    }
    scrollDown(follow);
  }

  function ratingButton(id, value, face, label) {
    var button = element("button", "rate", face);
    button.type = "button";
    button.dataset.rating = String(value);
    button.title = label;
    button.setAttribute("aria-label", label);
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", function () {
      if (!send({ type: "feedback", message: id, rating: value })) {
        showNotice(strings.offlineSend);
        return;
      }
      button.setAttribute("aria-busy", "true");
    });
    return button;
  }

  function showRating(id, value) {
    var row = ui.log.querySelector('.msg-bot[data-message-id="' + String(id).replace(/[^0-9]/g, "") + '"]');
    if (!row) return;
    Array.prototype.forEach.call(row.querySelectorAll("button.rate"), function (button) {
      button.removeAttribute("aria-busy");
      button.setAttribute("aria-pressed", String(Number(button.dataset.rating) === value));
    });
  }

  function showNotice(text) {
    ui.notice.textContent = text || "";
    ui.notice.hidden = !text;
  }

  function renderHistory(rows) {
    rows.forEach(function (message) {
      if (message.role === "user") {
        appendQuestion(message.text);
        return;
      }
      if (message.role === "agent") {
        appendAgent(message.text);
        return;
      }
      var answer = appendAnswer(message.id);
      renderToken(answer, message.text);
      finishAnswer(answer, {
        state: message.finish_reason === "cancelled" || message.finish_reason === "interrupted" ? "stopped" : "done",
        latency_ms: message.latency_ms,
        first_token_ms: message.first_token_ms,
        rating: message.rating,
        // what the answer's done frame showed live
        handoffOffered: message.handoff_offered === true,
        cited: Array.isArray(message.cited) ? message.cited : [],
        suggestions: Array.isArray(message.suggestions) ? message.suggestions : [],
      });
    });
    scrollDown(true);
  }

  // --- controls ---

  function isOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN;
  }

  function updateControls() {
    var working = pending !== null || streaming !== null;
    ui.send.hidden = working;
    ui.stop.hidden = !working;
    ui.send.disabled = !isOpen() || working;
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function send(frame) {
    if (!isOpen()) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  function sendQuestion() {
    var text = ui.input.value.trim();
    if (!text || pending || streaming) return;
    if (!isOpen()) {
      showNotice(strings.offlineSend);
      return;
    }
    showNotice("");
    if (handoffState === "closed") {
      // A closed conversation takes no more messages: this one starts a new conversation.
      rememberConversation(null);
      ui.handoff.dataset.shown = "";
      showHandoff("bot");
    }
    pending = { text: text, bubble: appendQuestion(text), retried: false, stopRequested: false };
    scrollDown(true);
    send({ type: "message", text: text, conversation: conversation });
    ui.input.value = "";
    fitInput();
    updateControls();
  }

  /* The question got no answer: mark it, and give its text back to the input to send again. */
  function questionFailed() {
    if (!pending) return;
    pending.bubble.classList.add("failed");
    if (!ui.input.value) {
      ui.input.value = pending.text;
      fitInput();
    }
    pending = null;
    clearInterval(busyTimer);
    busyTimer = null;
    updateControls();
  }

  function stop() {
    if (streaming) {
      send({ type: "cancel" });
      finishAnswer(streaming, { state: "stopped" });
      streaming = null;
    } else if (pending && busyTimer) {
      // Waiting to retry after `busy`: nothing is running on the server.
      showNotice("");
      questionFailed();
    } else if (pending) {
      // Frames are handled in order: the server starts this answer, then stops it at once.
      pending.stopRequested = true;
      send({ type: "cancel" });
    }
    updateControls();
    ui.input.focus();
  }

  function newConversation() {
    if (streaming || pending) stop();
    pending = null;
    streaming = null;
    clearInterval(busyTimer);
    busyTimer = null;
    rememberConversation(null);
    ui.handoff.dataset.shown = "";
    showHandoff("bot");
    Array.prototype.slice.call(ui.log.querySelectorAll(".msg")).forEach(function (row) {
      row.remove();
    });
    ui.empty.hidden = false;
    showNotice("");
    updateControls();
    ui.input.focus();
  }

  function fitInput() {
    // Grow with the text up to a few lines (border-box: the borders come on top of scrollHeight).
    var input = ui.input;
    input.style.height = "auto";
    var borders = input.offsetHeight - input.clientHeight;
    input.style.height = Math.min(input.scrollHeight + borders, 160) + "px";
    input.style.overflowY = input.scrollHeight + borders > 160 ? "auto" : "hidden";
  }

  // --- frames from the server ---

  var errorTexts = {
    rate_limited: "errorRateLimited",
    too_long: "errorTooLong",
    unavailable: "errorUnavailable",
    timeout: "errorCutShort",
    error: "errorCutShort",
    busy_conversation: "errorWait",
    closed: "errorClosed",
  };

  function onError(frame) {
    if (frame.reply_to === "join") {
      rememberConversation(null); // gone, or not this session's: the next message starts afresh
      return;
    }
    if (frame.code === "closed") showHandoff("closed");
    if (frame.code === "not_found" && pending) {
      // The stored conversation is gone or not ours (another browser session): start afresh.
      rememberConversation(null);
      appendNote(strings.errorNotFound, "error");
      questionFailed();
      return;
    }
    if (frame.code === "not_found") {
      appendNote(strings.errorFeedback, "error");
      Array.prototype.forEach.call(ui.log.querySelectorAll("button.rate[aria-busy]"), function (button) {
        button.removeAttribute("aria-busy");
      });
      return;
    }
    var key = errorTexts[frame.code];
    appendNote(key ? strings[key] : format(strings.errorGeneric, { detail: frame.detail || frame.code || "" }), "error");
    if (pending) questionFailed();
  }

  function onBusy(frame) {
    if (!pending) return;
    if (pending.retried) {
      showNotice(strings.stillBusy);
      questionFailed();
      return;
    }
    pending.retried = true;
    var left = Math.max(1, Math.ceil(Number(frame.retry_after) || 1));
    showNotice(format(strings.busy, { seconds: left }));
    busyTimer = setInterval(function () {
      left -= 1;
      if (left > 0) {
        showNotice(format(strings.busy, { seconds: left }));
        return;
      }
      clearInterval(busyTimer);
      busyTimer = null;
      showNotice("");
      if (!pending) return;
      if (!send({ type: "message", text: pending.text, conversation: conversation })) questionFailed();
    }, 1000);
  }

  function handleFrame(frame) {
    switch (frame && frame.type) {
      case "start":
        var stopRequested = pending !== null && pending.stopRequested;
        pending = null;
        if (frame.conversation) rememberConversation(frame.conversation);
        streaming = appendAnswer(frame.message);
        if (stopRequested) {
          finishAnswer(streaming, { state: "stopped" });
          streaming = null;
        }
        break;
      case "token":
        if (streaming && typeof frame.text === "string") renderToken(streaming, frame.text);
        break;
      case "replace": // the fact guard stopped a generated answer: its replacement instead
        if (streaming && typeof frame.text === "string") {
          streaming.text = "";
          renderToken(streaming, frame.text);
        }
        break;
      case "done":
        if (streaming) {
          finishAnswer(streaming, {
            state: "done",
            latency_ms: frame.latency_ms,
            first_token_ms: frame.first_token_ms,
            handoffOffered: frame.handoff_offered === true,
            cited: Array.isArray(frame.cited) ? frame.cited : [],
            suggestions: Array.isArray(frame.suggestions) ? frame.suggestions : [],
          });
          streaming = null;
        }
        break;
      case "feedback":
        showRating(frame.message, frame.rating);
        break;
      case "received": // stored for the agent; the assistant does not answer it
        pending = null;
        if (frame.conversation) rememberConversation(frame.conversation);
        break;
      case "handoff":
        if (frame.conversation) rememberConversation(frame.conversation);
        showHandoff(frame.state);
        break;
      case "agent":
        if (typeof frame.text === "string") appendAgent(frame.text);
        break;
      case "rated":
        ui.csat.hidden = true;
        ui.handoffText.textContent = strings.rated;
        break;
      case "busy":
        onBusy(frame);
        break;
      case "error":
        onError(frame);
        break;
      default:
        return; // frames of later protocol versions are ignored
    }
    updateControls();
  }

  // --- the socket, reconnected with backoff ---

  function socketUrl() {
    var path = config.wsPath;
    if (config.widgetToken) path += (path.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(config.widgetToken);
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    reconnectTimer = countdownTimer = null;
    setStatus("connecting", strings.connecting);
    var ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    socket = ws;
    ws.addEventListener("open", function () {
      reconnectAttempts = 0;
      setStatus("online", strings.online);
      showNotice("");
      // Follow the conversation again: staff replies and state changes reach this socket.
      if (conversation) send({ type: "join", conversation: conversation });
      updateControls();
    });
    ws.addEventListener("message", function (event) {
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      handleFrame(frame);
    });
    ws.addEventListener("close", function () {
      if (socket !== ws) return;
      socket = null;
      dropped();
      scheduleReconnect();
    });
  }

  /* What was in flight when the socket closed is lost with it. */
  function dropped() {
    if (streaming) {
      finishAnswer(streaming, { state: "interrupted" });
      streaming = null;
    }
    if (pending) {
      appendNote(strings.lostQuestion, "error");
      questionFailed();
    }
    updateControls();
  }

  function scheduleReconnect() {
    var delay = Math.min(RECONNECT_MAX_MS, 1000 * Math.pow(2, reconnectAttempts)) * (0.75 + Math.random() * 0.5);
    reconnectAttempts += 1;
    var due = Date.now() + delay;
    var tick = function () {
      setStatus("offline", format(strings.reconnecting, { seconds: Math.max(0, Math.ceil((due - Date.now()) / 1000)) }));
    };
    tick();
    countdownTimer = setInterval(tick, 1000);
    reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (socket === null) connect();
  }

  // --- wiring ---

  ui.form.addEventListener("submit", function (event) {
    event.preventDefault();
    sendQuestion();
  });
  ui.input.addEventListener("keydown", function (event) {
    // Enter sends, Shift+Enter is a newline; Enter that confirms an IME composition is neither.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      sendQuestion();
    }
  });
  ui.input.addEventListener("input", fitInput);
  ui.stop.addEventListener("click", stop);
  ui.newConversation.addEventListener("click", newConversation);
  ui.person.addEventListener("click", function () {
    if (!send({ type: "handoff", conversation: conversation })) showNotice(strings.offlineSend);
  });
  Array.prototype.forEach.call(ui.csat.querySelectorAll("button.csat"), function (button) {
    button.addEventListener("click", function () {
      send({ type: "rate", conversation: conversation, rating: Number(button.dataset.score) });
    });
  });
  ui.status.addEventListener("click", reconnectNow);
  window.addEventListener("online", reconnectNow);

  var reload = config.widgetToken ? widgetReload() : null;
  if (reload) {
    location.replace(reload); // once: the address now names a token
    return;
  }
  var asked = new URL(location.href).searchParams.get("conversation");
  if (config.conversation) {
    rememberConversation(config.conversation);
    renderHistory(config.history || []);
  } else if (asked) {
    rememberConversation(null); // not ours, or gone: start a new one
  } else if (storedConversation()) {
    // Same tab, page opened without the id: ask the server for its history.
    var url = new URL(location.href);
    url.searchParams.set("conversation", storedConversation());
    location.replace(url.toString());
    return;
  }

  // For debugging from the console and for the browser test: feed a frame as if the server sent it.
  window.csplatformChat = Object.freeze({ handleFrame: handleFrame });

  showHandoff(handoffState);
  updateControls();
  connect();
})();
