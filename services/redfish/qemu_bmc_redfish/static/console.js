// The serial console page: xterm.js on the WebSocket /console/<machine>/ws, raw bytes both ways.
"use strict";
(function () {
  const element = document.getElementById("terminal");
  const status = document.getElementById("status");
  const machine = element.dataset.machine;
  const interactive = element.dataset.interactive === "true";
  const term = new Terminal({ scrollback: 10000, convertEol: false, disableStdin: !interactive,
                              fontFamily: "monospace", cursorBlink: true });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(element);
  fit.fit();
  window.addEventListener("resize", () => fit.fit());
  window.term = term;  // for tests and the browser's console

  function show(text) {
    status.textContent = text + (interactive ? "" : " (read-only)");
    document.body.dataset.state = text;
  }

  const encoder = new TextEncoder();
  let ticket = element.dataset.ticket;
  let socket = null;

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = ticket ? "?ticket=" + encodeURIComponent(ticket) : "";
    ticket = "";  // one use: a reconnection relies on the browser's credentials
    socket = new WebSocket(scheme + "//" + location.host + "/console/" + encodeURIComponent(machine) + "/ws" + query);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => show("connected");
    socket.onmessage = (event) => {
      term.write(typeof event.data === "string" ? event.data : new Uint8Array(event.data));
    };
    socket.onclose = () => {
      show("disconnected");
      setTimeout(connect, 3000);
    };
  }

  function send(bytes) {
    if (interactive && socket && socket.readyState === WebSocket.OPEN) socket.send(bytes);
  }
  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  connect();
  term.focus();
})();
