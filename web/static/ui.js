// Stowage web UI: small improvements over the plain HTML pages, which work without this file.
// Served from this origin only (the pages' Content-Security-Policy allows no inline script).
"use strict";
document.documentElement.classList.add("js");
document.addEventListener("click", function (event) {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const text = button.dataset.copy || "";
  const done = function () {
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = "Copy"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () {});
  } else {
    // Plain-HTTP origins have no clipboard API: select the command for the user to copy.
    const code = button.parentElement.querySelector("code");
    if (code) {
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Selected";
    }
  }
});
