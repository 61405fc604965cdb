// Live parts of a page: each element with data-live is replaced by what its server-sent events carry.
// The browser's EventSource reconnects by itself; open <details> and the focused link survive a swap.
"use strict";
(function () {
  function swap(element, html) {
    const open = new Set([...element.querySelectorAll("details[open][data-key]")].map(d => d.dataset.key));
    const focused = document.activeElement && element.contains(document.activeElement)
      ? document.activeElement.getAttribute("href") : null;
    element.innerHTML = html;
    element.querySelectorAll("details[data-key]").forEach(d => { if (open.has(d.dataset.key)) d.open = true; });
    if (focused) {
      const again = element.querySelector(`a[href="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
    element.dispatchEvent(new CustomEvent("live:updated", {bubbles: true}));
  }

  document.querySelectorAll("[data-live]").forEach(element => {
    const source = new EventSource(element.dataset.live);
    source.addEventListener(element.dataset.event, event => swap(element, event.data));
    source.addEventListener("gone", () => {
      source.close();
      element.insertAdjacentHTML("afterbegin",
        '<p class="notice bad" role="alert">This object is gone from the cluster.</p>');
    });
    source.onerror = () => element.classList.add("stale");
    source.onopen = () => element.classList.remove("stale");
  });
})();
