// Progressive enhancement only: every page works without this file.
"use strict";

// Record pickers: suggest "Name (#id)" from the seat's visible records as it types.
function setupLookups() {
  document.querySelectorAll("input[data-lookup]").forEach(function (input) {
    var list = document.getElementById(input.getAttribute("list"));
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      var q = input.value.trim();
      if (q.length < 1 || /\(#\d+\)$/.test(q)) return;
      timer = setTimeout(function () {
        fetch(input.dataset.lookup + "?q=" + encodeURIComponent(q), {credentials: "same-origin"})
          .then(function (r) { return r.ok ? r.json() : []; })
          .then(function (rows) {
            list.textContent = "";
            rows.forEach(function (row) {
              var opt = document.createElement("option");
              opt.value = row.label;
              list.appendChild(opt);
            });
          });
      }, 200);
    });
  });
}

// Pipeline board: drag a card to another column to change its stage.
function setupBoard() {
  var board = document.querySelector(".board");
  if (!board) return;
  var csrf = board.dataset.csrf;
  var failed = board.dataset.error;
  var dragged = null;
  board.querySelectorAll(".card.opp").forEach(function (card) {
    card.addEventListener("dragstart", function (e) {
      dragged = card;
      card.classList.add("dragging");
      e.dataTransfer.setData("text/plain", card.dataset.id);
      e.dataTransfer.effectAllowed = "move";
    });
    card.addEventListener("dragend", function () { card.classList.remove("dragging"); dragged = null; });
  });
  board.querySelectorAll(".column").forEach(function (column) {
    column.addEventListener("dragover", function (e) { e.preventDefault(); column.classList.add("drop-target"); });
    column.addEventListener("dragleave", function () { column.classList.remove("drop-target"); });
    column.addEventListener("drop", function (e) {
      e.preventDefault();
      column.classList.remove("drop-target");
      if (!dragged || dragged.closest(".column") === column) return;
      var card = dragged;
      var body = new URLSearchParams({stage: column.dataset.stage, csrf_token: csrf});
      fetch(card.dataset.move, {method: "POST", body: body, credentials: "same-origin",
                                headers: {"Accept": "application/json", "X-CSRFToken": csrf}})
        .then(function (r) { return r.json().then(function (data) { return {ok: r.ok, data: data}; }); })
        .then(function (res) {
          if (!res.ok) { alert(res.data.error || failed); return; }
          column.querySelector("ol.cards").prepend(card);
          var select = card.querySelector("select[name=stage]");
          if (select) select.value = res.data.stage;
          card.dataset.stage = res.data.stage;
        })
        .catch(function () { alert(failed); });
    });
  });
}

document.addEventListener("DOMContentLoaded", function () { setupLookups(); setupBoard(); });
