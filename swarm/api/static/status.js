// Refresh the status page every few seconds: fetch the server-rendered part and swap it in.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var updated = document.getElementById("updated");
  var key = main.getAttribute("data-key");
  var url = "./?partial=1" + (key ? "&key=" + encodeURIComponent(key) : "");
  function refresh() {
    fetch(url, { cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        main.innerHTML = html;
        updated.textContent = new Date().toLocaleTimeString();
        updated.classList.remove("stale");
      })
      .catch(function () { updated.textContent = "gateway unreachable, retrying"; })
      .finally(function () { setTimeout(refresh, 3000); });
  }
  setTimeout(refresh, 3000);
})();
