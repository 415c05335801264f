// Shared by the job pages: a WebSocket to /ws/jobs/… that reconnects, and
// receives typed events; the server sends the current state first.
//
// Every job event carries `seq` (1, 2, 3 … per job) and a snapshot says each job's
// `event_seq`. A repeat (an event published while the snapshot was read) is
// skipped; a gap means the channel layer dropped events for this socket (a
// watcher more than its capacity behind), so the page reconnects for a fresh
// snapshot instead of staying at a stale state — possibly "running" forever.
window.BerthLive = function (path, onEvent, status) {
  "use strict";
  var delay = 1000;
  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + path);
    var seen = {};  // job id → the last seq this socket showed
    socket.onopen = function () { delay = 1000; if (status) status.textContent = "live"; };
    socket.onmessage = function (message) {
      var event = JSON.parse(message.data);
      if (event.type === "snapshot") {
        event.jobs.forEach(function (job) { seen[job.id] = job.event_seq; });
      } else if (event.job && typeof event.seq === "number") {
        var last = seen[event.job.id];
        if (last !== undefined && event.seq <= last) return;
        if (last !== undefined && event.seq > last + 1) {
          if (status) status.textContent = "catching up…";
          delay = 0;  // at once: nothing is wrong with the server
          socket.close();
          return;
        }
        seen[event.job.id] = event.seq;
      }
      onEvent(event);
    };
    socket.onclose = function () {
      if (status && delay) status.textContent = "reconnecting…";
      setTimeout(connect, delay);
      delay = Math.min(Math.max(delay, 500) * 2, 15000);
    };
  }
  connect();
};
