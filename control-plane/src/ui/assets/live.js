// keycap dashboard: a run's audit entries arriving live. The Run page
// renders its entries without this script; with it, rows the server sends
// over /ui/runs/{label}/events are added at the top of the table. Cells are
// set as text (never parsed as HTML), so an entry cannot inject markup.
"use strict";
(function () {
  var table = document.getElementById("run-audit");
  if (!table || !window.EventSource) {
    return;
  }
  var body = table.tBodies[0];
  var status = document.getElementById("live-status");
  var url = "/ui/runs/" + encodeURIComponent(table.dataset.label) + "/events";
  if (table.dataset.after) {
    url += "?after=" + encodeURIComponent(table.dataset.after);
  }
  var say = function (text) {
    if (status) {
      status.textContent = text;
    }
  };
  var source = new EventSource(url);
  source.addEventListener("open", function () {
    say("Live: new entries appear at the top.");
  });
  source.addEventListener("error", function () {
    say("Live updates paused; retrying.");
  });
  source.addEventListener("end", function () {
    source.close();
    say("Live updates ended: sign in again.");
  });
  source.addEventListener("audit", function (ev) {
    var entry = JSON.parse(ev.data);
    if (document.getElementById("audit-" + entry.seq)) {
      return;
    }
    var row = document.createElement("tr");
    row.id = "audit-" + entry.seq;
    row.className = "fresh";
    entry.cells.forEach(function (text) {
      var cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
    var empty = document.getElementById("run-audit-empty");
    if (empty) {
      empty.hidden = true;
    }
    table.hidden = false;
  });
})();
