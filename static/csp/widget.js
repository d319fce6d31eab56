/* The chat widget for other sites (docs/widget.md). On any page:
 *
 *   <script src="https://cs.example.com/static/csp/widget.js" data-title="…" data-color="#2563eb"
 *           data-greeting="…" data-lang="zh-hans" async></script>
 *
 * draws a chat button at the bottom right that opens the platform's chat (/widget/, the chat page
 * in compact form) in a frame. The frame is the platform's own origin: the conversation, its
 * session and its storage stay there, and the page around it sees none of it. The two talk by
 * postMessage only, each naming the other's origin as the target and checking the sender's
 * (static/js/widget-frame.js is the other side). Every request goes to the platform, none
 * elsewhere.
 *
 * The button appears once the frame has loaded and said "ready": a site the platform does not
 * list in CSP_WIDGET_ORIGINS gets a refused frame and no button. Plain ES2017, no build step;
 * everything is built with the DOM (no markup strings) inside a shadow root, so the site's styles
 * and the widget's do not meet.
 */
(function () {
  "use strict";

  var SOURCE = "csplatform-widget";
  var script = document.currentScript;
  if (!script || document.getElementById("csplatform-widget")) return; // the snippet twice: one widget
  var platform = new URL(script.src).origin;
  var options = script.dataset;

  var frameUrl = new URL("/widget/", platform);
  frameUrl.searchParams.set("origin", location.origin);
  ["title", "greeting", "lang"].forEach(function (name) {
    if (options[name]) frameUrl.searchParams.set(name, options[name]);
  });
  var color = /^#(?:[0-9a-f]{3}){1,2}$/i.test(options.color || "") ? options.color : "";
  if (color) frameUrl.searchParams.set("color", color);

  function element(tag, attributes) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (name) {
      node.setAttribute(name, attributes[name]);
    });
    return node;
  }

  function chatIcon() {
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z");
    svg.appendChild(path);
    return svg;
  }

  // --- the elements: shown only once both the styles and the frame have loaded ---

  var host = element("div", { id: "csplatform-widget" });
  host.style.display = "none"; // CSSOM, which a site's style-src policy allows
  if (color) host.style.setProperty("--csp-accent", color);
  var root = host.attachShadow({ mode: "open" });

  var styles = element("link", { rel: "stylesheet", href: new URL("/static/csp/widget.css", platform).href });
  var panel = element("div", { class: "panel", id: "panel", role: "dialog", "aria-labelledby": "title" });
  panel.hidden = true;
  var header = element("div", { class: "header" });
  var title = element("h2", { class: "title", id: "title" });
  var close = element("button", { type: "button", class: "close" });
  close.textContent = "×";
  header.appendChild(title);
  header.appendChild(close);
  var frame = element("iframe", { src: frameUrl.href, class: "frame" });
  panel.appendChild(header);
  panel.appendChild(frame);

  var bubble = element("button", { type: "button", class: "bubble", "aria-expanded": "false", "aria-controls": "panel" });
  var badge = element("span", { class: "badge", "aria-hidden": "true" });
  badge.hidden = true;
  bubble.appendChild(chatIcon());
  bubble.appendChild(badge);

  root.appendChild(styles);
  root.appendChild(panel);
  root.appendChild(bubble);

  var strings = null; // the frame's translated labels, from its "ready" message
  var unread = 0;
  var styled = false;

  function showWhenReady() {
    if (styled && strings) host.style.display = "";
  }

  function labelBubble() {
    var label = strings.open;
    if (unread) label += " (" + strings.unread.replace("%(count)s", String(unread)) + ")";
    bubble.setAttribute("aria-label", label);
    bubble.title = label;
    badge.textContent = String(unread);
    badge.hidden = unread === 0;
  }

  // --- opening and closing ---

  function isOpen() {
    return !panel.hidden;
  }

  function open() {
    panel.hidden = false;
    host.dataset.open = "true";
    bubble.setAttribute("aria-expanded", "true");
    unread = 0;
    labelBubble();
    frame.focus();
    frame.contentWindow.postMessage({ source: SOURCE, type: "open" }, platform);
  }

  function shut() {
    panel.hidden = true;
    delete host.dataset.open;
    bubble.setAttribute("aria-expanded", "false");
    bubble.focus();
  }

  bubble.addEventListener("click", function () {
    if (isOpen()) shut();
    else open();
  });
  close.addEventListener("click", shut);
  root.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && isOpen()) shut();
  });
  styles.addEventListener("load", function () {
    styled = true;
    showWhenReady();
  });

  // --- messages from the frame: only the platform's, only from this frame ---

  window.addEventListener("message", function (event) {
    if (event.origin !== platform || event.source !== frame.contentWindow) return;
    var data = event.data;
    if (!data || data.source !== SOURCE) return;
    if (data.type === "ready" && data.strings) {
      strings = data.strings;
      title.textContent = strings.title;
      frame.title = strings.title;
      close.setAttribute("aria-label", strings.close);
      close.title = strings.close;
      labelBubble();
      host.dataset.ready = "true";
      showWhenReady();
    } else if (data.type === "reply" && !isOpen() && strings) {
      unread += 1;
      labelBubble();
    } else if (data.type === "close" && isOpen()) {
      shut();
    }
  });

  (document.body || document.documentElement).appendChild(host);
})();
