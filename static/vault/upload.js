// Streams the chosen file as a raw body to the vault; the browser reads it from disk
// piece by piece, and the progress bar follows bytes actually sent.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form) return;
  var bar = document.getElementById("upload-bar");
  var status = document.getElementById("upload-status");
  var meter = bar.parentElement;

  function show(percent, text) {
    bar.style.width = percent + "%";
    meter.setAttribute("aria-valuenow", String(Math.round(percent)));
    status.textContent = text;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = document.getElementById("f-file").files[0];
    if (!file) { show(0, "Choose a file first."); return; }
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.endpoint);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRFToken", form.dataset.csrf);
    xhr.setRequestHeader("X-Berth-Name", document.getElementById("f-name").value);
    var guest = document.getElementById("f-guest").value;
    var host = document.getElementById("f-host").value;
    if (guest) xhr.setRequestHeader("X-Berth-Guest-Name", guest);
    if (host) xhr.setRequestHeader("X-Berth-Source-Host", host);
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) show(100 * e.loaded / e.total, "Sent " + e.loaded + " of " + e.total + " bytes");
    };
    xhr.onload = function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
      if (xhr.status === 201) {
        show(100, "Stored. Opening the image…");
        window.location.href = "/vault/" + body.id + "/";
      } else {
        show(0, "Upload refused: " + (body.detail || xhr.statusText));
      }
    };
    xhr.onerror = function () { show(0, "The connection failed; nothing was stored."); };
    show(0, "Starting…");
    xhr.send(file);
  });
})();
