// Shared by the job pages: a WebSocket to /ws/jobs/… that reconnects, and
// receives typed events; the server sends the current state first.
window.BerthLive = function (path, onEvent, status) {
  "use strict";
  var delay = 1000;
  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + path);
    socket.onopen = function () { delay = 1000; if (status) status.textContent = "live"; };
    socket.onmessage = function (message) { onEvent(JSON.parse(message.data)); };
    socket.onclose = function () {
      if (status) status.textContent = "reconnecting…";
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    };
  }
  connect();
};
