# Playnite (Windows): Settings → Scripts → Game scripts → "Execute after exiting a game".
# Ends what playnite-before.ps1 opened; returns at once (Start-Process).
$Server = "http://127.0.0.1:8731"
$Rules = @{
    # "Call of Duty: Modern Warfare III" = "cod";
}
$Rule = $Rules[$Game.Name]
if (-not $Rule) { $Rule = (($Game.Name.ToLower() -replace '[^a-z0-9_.]+', '-').Trim('-.')) }
Start-Process -WindowStyle Hidden -FilePath "igdtrigger.exe" `
    -ArgumentList @("deactivate", $Rule, "--timeout", "1", "--server", $Server)
