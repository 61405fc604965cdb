// Signing in with a gateway API key: the key may also be kept in this browser for the playground.
"use strict";
(function () {
  const form = document.getElementById("login-form");
  if (!form || form.dataset.mode !== "api-key") return;
  form.addEventListener("submit", () => {
    const remember = document.getElementById("remember-key");
    if (remember && remember.checked) localStorage.setItem("cxygpt.apiKey", document.getElementById("credential").value);
  });
})();
