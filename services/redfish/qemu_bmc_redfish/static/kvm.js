// The graphical console page: noVNC on the WebSocket /kvm/<machine>/ws (binary RFB), a send-keys
// menu for the keys the browser keeps for itself, and a new connection (with a fresh ticket) after
// a disconnect: a power cycle, a restart of the machine service. A viewer whose login may type
// can still be view only: the machine has kvm_control = "first" and another viewer has control
// (the service says so by the WebSocket subprotocol it picks).
import RFB from "./novnc/core/rfb.js";
import KeyTable from "./novnc/core/input/keysym.js";

const screen = document.getElementById("screen");
const status = document.getElementById("status");
const keys = document.getElementById("keys");
const machine = screen.dataset.machine;
const interactive = screen.dataset.interactive === "true";
const base = "/kvm/" + encodeURIComponent(machine);
let ticket = screen.dataset.ticket;
let rfb = null;
let retryDelay = 1000;
let controlled = interactive;  // this connection has control (the service's subprotocol says)
const CONTROL_PROTOCOL = "qemu-bmc-control";
const VIEW_PROTOCOL = "qemu-bmc-view";

const K = KeyTable;
// [keysym, KeyboardEvent.code] chords, pressed in order and released in reverse
const CHORDS = {
  "ctrl-alt-del": null,  // RFB.sendCtrlAltDel
  "ctrl-w": [[K.XK_Control_L, "ControlLeft"], [K.XK_w, "KeyW"]],
  "ctrl-t": [[K.XK_Control_L, "ControlLeft"], [K.XK_t, "KeyT"]],
  "ctrl-n": [[K.XK_Control_L, "ControlLeft"], [K.XK_n, "KeyN"]],
  "alt-tab": [[K.XK_Alt_L, "AltLeft"], [K.XK_Tab, "Tab"]],
  "alt-f4": [[K.XK_Alt_L, "AltLeft"], [K.XK_F4, "F4"]],
  "ctrl-alt-f1": [[K.XK_Control_L, "ControlLeft"], [K.XK_Alt_L, "AltLeft"], [K.XK_F1, "F1"]],
  "ctrl-alt-f2": [[K.XK_Control_L, "ControlLeft"], [K.XK_Alt_L, "AltLeft"], [K.XK_F2, "F2"]],
  "f11": [[K.XK_F11, "F11"]],
  "f12": [[K.XK_F12, "F12"]],
  "print": [[K.XK_Print, "PrintScreen"]],
  "super": [[K.XK_Super_L, "MetaLeft"]],
  "escape": [[K.XK_Escape, "Escape"]],
};

function show(state, detail) {
  const only = !interactive ? " (view only)" : controlled ? "" : ", view only (another viewer has control)";
  status.textContent = state + (detail ? ": " + detail : "") + only;
  document.body.dataset.state = state;
}

async function freshTicket() {
  const response = await fetch(base + "/ticket", { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error("HTTP " + response.status);
  return (await response.json()).ticket;
}

function later() {
  setTimeout(connect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, 10000);
}

async function connect() {
  if (!ticket) {
    try {
      ticket = await freshTicket();
    } catch (error) {
      show("disconnected", "no ticket (" + error.message + ")");
      later();
      return;
    }
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(scheme + "//" + location.host + base + "/ws?ticket=" + encodeURIComponent(ticket),
                               [CONTROL_PROTOCOL, VIEW_PROTOCOL]);
  ticket = "";  // one use: the next connection fetches another
  let reason = "";
  socket.addEventListener("close", (event) => { reason = event.reason; });  // before noVNC's handler
  show("connecting");
  rfb = new RFB(screen, socket, { shared: true });
  controlled = interactive;
  rfb.viewOnly = !interactive;
  rfb.scaleViewport = true;
  rfb.background = "#000";
  rfb.addEventListener("connect", () => {
    retryDelay = 1000;
    controlled = interactive && socket.protocol !== VIEW_PROTOCOL;
    rfb.viewOnly = !controlled;
    keys.disabled = !controlled;
    show("connected");
    if (controlled) rfb.focus();
  });
  rfb.addEventListener("disconnect", () => {
    rfb = null;
    window.rfb = null;
    show("disconnected", reason);
    later();
  });
  window.rfb = rfb;  // for tests and the browser's console
}

keys.addEventListener("change", () => {
  const chord = CHORDS[keys.value];
  if (rfb && controlled) {
    if (chord === null) {
      rfb.sendCtrlAltDel();
    } else if (chord) {
      for (const [keysym, code] of chord) rfb.sendKey(keysym, code, true);
      for (const [keysym, code] of [...chord].reverse()) rfb.sendKey(keysym, code, false);
    }
    rfb.focus();
  }
  keys.value = "";
});

connect();
