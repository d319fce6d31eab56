/* The chat page inside the widget's frame (/widget/, chat/widget.py), next to chat.js: tells the
 * embedding page's static/csp/widget.js what it needs, by postMessage to that page's origin only
 * (config.parentOrigin, which the server gives only to origins allowed to frame the widget), and
 * takes its "open" message only from that origin.
 *
 * Messages, all {source: "csplatform-widget", type, ...}:
 *   frame -> page: ready {strings} (the translated labels), reply (an answer finished or staff
 *                  wrote: the page counts it while closed), close (Escape pressed in the frame);
 *   page -> frame: open (the panel was opened: focus the message field).
 */
(function () {
  "use strict";

  var SOURCE = "csplatform-widget";
  var config = JSON.parse(document.getElementById("chat-config").textContent);
  var parentOrigin = config.parentOrigin;
  if (!parentOrigin || window.parent === window) return;

  function post(type, extra) {
    var message = { source: SOURCE, type: type };
    Object.keys(extra || {}).forEach(function (key) {
      message[key] = extra[key];
    });
    window.parent.postMessage(message, parentOrigin);
  }

  // Rows chat.js adds from now on (a reloaded conversation's history is already on the page).
  new MutationObserver(function (records) {
    records.forEach(function (record) {
      var row = record.target;
      if (record.type === "attributes") {
        if (row.classList.contains("msg-bot") && row.dataset.state === "done") post("reply");
        return;
      }
      Array.prototype.forEach.call(record.addedNodes, function (node) {
        if (node.classList && node.classList.contains("msg-agent")) post("reply");
      });
    });
  }).observe(document.getElementById("chat-log"), { childList: true, subtree: true, attributes: true, attributeFilter: ["data-state"] });

  window.addEventListener("message", function (event) {
    if (event.source !== window.parent || event.origin !== parentOrigin) return;
    var data = event.data;
    if (data && data.source === SOURCE && data.type === "open") document.getElementById("chat-input").focus();
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && !event.isComposing) post("close");
  });

  var strings = document.getElementById("widget-strings").dataset;
  post("ready", { strings: { title: strings.title, open: strings.open, close: strings.close, unread: strings.unread } });
})();
