#!/usr/bin/env python3
"""Generate loratune's shipped example dataset for the fictional company Nimbrel Home.

Writes, deterministically (fixed seed, Python 3 standard library only):
  datasets/nimbrel/support_chat.jsonl   chat conversations, OpenAI `messages` format
  datasets/nimbrel/policies_alpaca.csv  alpaca rows: instruction,input,output,system

Every fact comes from datasets/nimbrel/FACTS.md. The text below is a hand-written bank: per topic several
phrasings of the question, an optional set of follow-up phrasings for multi-turn chats, and answers (a question
may carry its own answer when the generic one would not fit). The script only decides which phrasing goes to
which file, pairs answers, builds multi-turn chats from related topics and adds a system prompt to some.
Each question phrasing is used at most once across both training files. heldout.jsonl is written by hand and
is not produced here; scripts/validate_dataset.py checks that its questions are absent from the training files.

Usage: python3 scripts/make_company_dataset.py [--out datasets/nimbrel]
"""

import argparse
import csv
import io
import json
import pathlib
import random

SEED = 20250611
SYSTEM = "You are Aria, the support assistant of Nimbrel Home."
N_MULTI = 90  # multi-turn conversations in the chat file

TOPICS = []


def topic(tid, group, kind, q, a, f=()):
    """q: question phrasings, each a str or a (question, specific_answer) pair; a: generic answers;
    f: short follow-up phrasings usable as a later turn of a conversation, each a str (fits after any opener)
    or a (phrasing, "group group") pair when it only reads naturally after an opener from those groups."""
    qs = [(x, None) if isinstance(x, str) else (x[0], x[1]) for x in q]
    fs = [(x, None) if isinstance(x, str) else (x[0], set(x[1].split())) for x in f]
    TOPICS.append({"id": tid, "group": group, "kind": kind, "q": qs, "a": list(a), "f": fs})


C, I = "customer", "internal"

# ----------------------------------------------------------------------------------------------------------
# Returns and refunds
topic("return_window", "returns", C, [
    "What's your return policy?",
    "How long do I have to return a Nimbrel device?",
    "Can I return my Hub if I don't like it?",
    "What is the return window for Nimbrel products?",
    "I changed my mind about my Thermo. Can I still send it back?",
    ("My Cam arrived three weeks ago and I'm not happy with it. Is it too late to return it?",
     "Not at all. You have 45 days from delivery to return it, so three weeks in you're well within the window."),
    "How many days after delivery can I return something?",
    ("Do you accept returns on opened items?",
     "Yes. Opened and used devices can be returned within 45 days of delivery, as long as you include all parts "
     "and accessories."),
    "Is there a deadline for returning a Starter Kit?",
    "If I'm not satisfied, can I get my money back?",
    "What's the time limit on returns?",
    "Is it possible to return something after a month?",
    "How long is your return period?",
], [
    "You can return any Nimbrel device within 45 days of delivery, for any reason, as long as you include all "
    "parts and accessories.",
    "Our return window is 45 days from the delivery date. Opened and used devices are fine; just send back "
    "everything that came in the box.",
    "You have 45 days from delivery to return it for a full refund, no reason needed.",
], [
    "And how long do I have to return something?",
    ("What's the deadline if I want to send it back?", "products shipping"),
    ("If it doesn't work out, can I return it?", "products shipping"),
])

topic("return_how", "returns", C, [
    "How do I start a return?",
    "What's the process for returning an order?",
    "Where do I go to send a device back?",
    "I want to return my Leak sensor. What do I do?",
    "How can I get a return label?",
    "What are the steps to send my Cam back?",
], [
    "Go to Orders on account.nimbrel.example, choose the item and select Return. We'll email you a prepaid "
    "return label right away.",
    "Open your order at account.nimbrel.example and click Return, or ask us here in chat. You'll get a prepaid "
    "label by email to print and stick on the box.",
], [
    ("OK, how do I actually start the return?", "returns"),
    ("How do I send it back?", "returns products shipping"),
])

topic("return_label", "returns", C, [
    "Do I have to pay for return shipping?",
    "Is the return label free?",
    "Who covers the postage when I return something?",
    "Will return shipping be deducted from my refund?",
    ("I live in France. Is returning an item free for me too?",
     "Yes. Returns from every EU country are free: we email you a prepaid label, and nothing is deducted from "
     "your refund."),
], [
    "Return shipping is free. We send a prepaid label for returns from the US, Canada, the EU and the UK, and "
    "nothing is deducted from your refund.",
    "It costs you nothing: the prepaid return label is free in every country we ship to (US, Canada, EU and "
    "UK).",
], [
    ("Do I pay for the shipping back?", "returns"),
    "Is the return label free?",
])

topic("refund_time", "returns", C, [
    "How long does it take to get my refund?",
    "When will I see the money from my return?",
    "I sent my return last week. When is the refund processed?",
    "How fast are refunds?",
    "What's the refund processing time?",
    "My return was delivered to your warehouse on Tuesday. When do I get paid back?",
    "How many business days does a refund take?",
], [
    "We issue the refund within 5 business days of your return arriving at our warehouse. Your bank may need a "
    "few extra days to show it.",
    "Refunds are processed within 5 business days after the warehouse receives the item, and you'll get an "
    "email when it's done.",
], [
    ("How long until I get my money back?", "returns"),
    ("And when does the refund arrive?", "returns"),
    ("How long does the refund take after that?", "returns"),
])

topic("refund_method", "returns", C, [
    "Will my refund go back to my credit card?",
    ("Can I get store credit instead of a refund to my card?",
     "Refunds always go back to the original payment method. Store credit, as a Nimbrel gift card, is only used "
     "for returns of gifts."),
    "How is the refund paid out?",
    "I paid with PayPal. Where does my refund go?",
], [
    "Refunds always go back to the original payment method, whether that was a card or PayPal.",
    "We refund to the payment method you used for the order. Store credit is only used for returns of gifts.",
], [
    ("Does the money go back to my card?", "returns"),
])

topic("damaged_arrival", "returns", C, [
    "My Hub arrived broken. What should I do?",
    "The box was crushed and the camera lens is cracked.",
    "What happens if a device is damaged on arrival?",
    "One of the Sense sensors in my 4-pack is dead out of the box.",
    "I received a faulty thermostat. Can I get a replacement?",
    "My Leak sensor came with a cracked case.",
], [
    "Sorry about that! Report it within 7 days of delivery with a photo, in chat or at support@nimbrel.example, "
    "and we'll ship a free replacement right away.",
    "I'm sorry it arrived like that. Send us a photo within 7 days of delivery and we'll ship a replacement at no "
    "cost; you don't have to wait for the damaged one to come back.",
], [
    ("What if it arrives damaged?", "products shipping returns"),
])

topic("exchange", "returns", C, [
    "Can I exchange my Cam for a Thermo?",
    "Do you do exchanges?",
    "I ordered the wrong product. Can I swap it for a different one?",
    "Can I trade my single Sense for the 4-pack?",
], [
    "We don't do direct exchanges. Return the item within 45 days of delivery for a refund and place a new order "
    "for the one you want.",
    "Exchanges aren't possible, but you can return the device within 45 days and order the right one. The refund "
    "is issued within 5 business days of the return arriving.",
], [
    ("Can I exchange it for something else instead?", "returns"),
])

topic("gift_return", "returns", C, [
    "I got a Nimbrel Cam as a gift. Can I return it?",
    "How do gift returns work?",
    "Can I return a present without the buyer finding out?",
], [
    "Gifts can be returned within 45 days of delivery. Gift returns are refunded as a Nimbrel gift card, and the "
    "buyer isn't notified.",
    "Gift returns get a Nimbrel gift card instead of a refund to the buyer's payment method. The usual "
    "45 days from delivery apply.",
])

topic("retailer_return", "returns", C, [
    "I bought my Hub at an electronics store. Can I return it to you?",
    "Can I send back a device I bought from another retailer?",
    "My thermostat came from an online marketplace. Does your return policy apply?",
], [
    "Devices bought from another retailer have to be returned through that retailer, under their policy. Our "
    "warranty still applies, though.",
    "Returns within 45 days are only for orders from nimbrel.example. For retailer purchases, please return "
    "through the store; warranty claims can still come to us.",
])

topic("non_returnable", "returns", C, [
    "Can I return a gift card?",
    "Are there any items you don't take back?",
    "Can I return my subscription like a device?",
], [
    "Gift cards can't be returned, and subscriptions follow their own cancellation rules. Every hardware device "
    "can be returned within 45 days of delivery.",
])

topic("refuse_late_return", "returns", C, [
    "It's been two months since delivery, but can you make an exception and take my return?",
    "My return window ran out last week. Can you accept it anyway?",
    "Can you extend the return period for me? I was traveling.",
], [
    "I'm sorry, I can't make exceptions: returns are accepted within 45 days of delivery. If the device is "
    "faulty, it's covered by the warranty for 2 years, and our support team can help you with a claim.",
    "Unfortunately returns are only accepted within 45 days of delivery, and I can't extend that. If something "
    "is wrong with the device, a warranty claim is the way to go.",
])

# ----------------------------------------------------------------------------------------------------------
# Plans and billing
topic("plans_overview", "plans", C, [
    "What subscription plans do you offer?",
    "What's the difference between Free, Plus and Pro?",
    "Which Nimbrel plans are there?",
    ("Do I need a subscription to use my devices?",
     "No. Every device works on the Free plan, with app control, automations and 7 days of event history. Plus "
     "and Pro add longer history and cloud video."),
    "Can you compare your plans for me?",
], [
    "There are three plans: Free (7 days of event history), Plus at $4.50 a month (60 days of history, cloud "
    "video for up to 3 cameras) and Pro at $11 a month (180 days of history, unlimited cameras, priority phone "
    "support and a warranty of 3 years).",
    "Free gives you app control, automations and 7 days of history. Plus ($4.50/month or $45/year) adds 60 days "
    "of history and cloud clips for up to 3 cameras. Pro ($11/month or $110/year) has 180 days of history, "
    "unlimited cameras, phone support and 3 years of warranty.",
], [
    "What plans are there?",
    ("Do I need to pay for a subscription on top?", "products"),
])

topic("plus_price", "plans", C, [
    "How much is Nimbrel Plus?",
    "What's the price of the Plus plan?",
    "How much does Plus cost per year?",
    "Is there an annual option for Plus?",
    "What do I pay each month for Plus?",
    "Plus plan pricing?",
], [
    "Plus costs $4.50 per month, or $45 per year if you pay annually.",
    "Nimbrel Plus is $4.50 a month. The annual plan is $45, which works out to two months free.",
], [
    "How much is Plus?",
    "And what does Plus cost?",
])

topic("pro_price", "plans", C, [
    "How much is the Pro plan?",
    "What does Nimbrel Pro cost?",
    "Pro plan price per year?",
    "What's included in Pro and how much is it?",
    "Is Pro worth it? What does it cost?",
], [
    "Pro is $11 per month or $110 per year. It includes 180 days of history, unlimited cameras, priority phone "
    "support and a warranty of 3 years on your devices.",
    "Nimbrel Pro costs $11 a month, or $110 a year. You get 180 days of history, cloud video for unlimited "
    "cameras, the priority phone line and a warranty extended to 3 years.",
], [
    ("What about Pro?", "plans"),
    ("How much more is Pro?", "plans"),
])

topic("free_plan", "plans", C, [
    "What do I get on the Free plan?",
    "Is the Free plan really free forever?",
    "Can I record video without paying?",
    "What are the limits of the free tier?",
], [
    "The Free plan is free forever: app control, automations, live camera view and 7 days of event history. The "
    "Cam can also record locally to a microSD card.",
    "Free includes app control, automations, live view and 7 days of event history. Cloud video needs Plus or Pro, "
    "but the Cam can record to its own microSD card on Free.",
], [
    "What's included for free?",
])

topic("trial", "plans", C, [
    "Is there a free trial of Plus?",
    "Do I get Plus free when I buy a Hub?",
    "How long is the Plus trial?",
    "Do I need a credit card for the trial?",
    "What happens when my trial ends?",
    "Does the Hub come with a free subscription?",
], [
    "Every new Hub comes with 30 days of Plus for free. No card is needed, and you drop back to Free "
    "automatically when it ends.",
    "New Hubs include 30 days of Plus for free. If you don't subscribe, the account simply moves to the Free plan "
    "afterwards; nothing is charged.",
], [
    "Is there a trial?",
    "Can I try Plus first?",
])

topic("cancel_sub", "plans", C, [
    "How do I cancel my subscription?",
    "I want to stop paying for Plus.",
    "Where can I cancel Pro?",
    "Can I cancel anytime?",
    "Is there a contract, or can I stop whenever I want?",
], [
    "You can cancel anytime in the app under Settings > Subscription, or at account.nimbrel.example. Your plan "
    "stays active until the end of the billing period.",
    "Cancel from Settings > Subscription in the app or on account.nimbrel.example. You keep your benefits until "
    "the current billing period ends.",
], [
    ("How do I cancel it?", "plans"),
    ("And if I want to cancel later?", "plans"),
])

topic("annual_refund", "plans", C, [
    "Can I get a refund on my annual plan?",
    "I renewed Pro for a year by accident. Can I get my money back?",
    "Do you refund unused months?",
    "Are subscription fees refundable?",
    "I bought a year of Plus yesterday. Can I still get a refund?",
], [
    "Annual plans are refunded in full if you cancel within 14 days of purchase or renewal. Monthly plans aren't "
    "refunded for partial months.",
    "If you cancel an annual plan within 14 days of buying or renewing it, we refund it in full. After that, and "
    "for monthly plans, there are no partial refunds, but you keep access until the period ends.",
], [
    ("Can I get a refund if I change my mind?", "plans"),
    ("Do I get money back if I cancel?", "plans"),
])

topic("switch_plan", "plans", C, [
    "Can I upgrade from Plus to Pro?",
    "What happens if I downgrade to Free?",
    "How do plan changes work mid-month?",
    "If I switch to Pro today, do I pay the full price?",
], [
    "Upgrades take effect immediately and you're only charged the prorated difference. Downgrades take effect at "
    "the end of your current billing period.",
    "You can switch plans anytime in Settings > Subscription. Upgrading is immediate and prorated; downgrading "
    "kicks in when the current period ends.",
], [
    "Can I switch plans later?",
])

topic("history_len", "plans", C, [
    "How long is my event history kept?",
    "How far back can I see camera clips on Plus?",
    "How many days of history does each plan keep?",
    "Do older events get deleted?",
    "How long does Pro keep my history?",
], [
    "Event history is kept for 7 days on Free, 60 days on Plus and 180 days on Pro. Older events and clips are "
    "deleted automatically.",
    "It depends on your plan: 7 days on Free, 60 days on Plus, 180 days on Pro. Camera clips follow the same "
    "limits.",
], [
    ("How much history does that include?", "plans"),
    "How long are clips stored?",
])

topic("refuse_discount", "plans", C, [
    "Can you give me a discount code?",
    "Is there a coupon for my first order?",
    "Can you price match another store?",
], [
    "I can't create discount codes or match prices. Current offers are shown on nimbrel.example, and business "
    "or bulk orders can be discussed with partners@nimbrel.example.",
], [
    "Can you give me a discount?",
])

# ----------------------------------------------------------------------------------------------------------
# Support channels
topic("support_hours", "support", C, [
    "What are your support hours?",
    "When is customer support open?",
    "Is support available on weekends?",
    ("Can I reach you on a Sunday?",
     "Our chat team is closed on Sundays and US federal holidays, but you can email support@nimbrel.example "
     "anytime. We're back Monday from 7 am CT."),
    "What time does live chat close today?",
    "When can I talk to a person?",
    "Are you open on Saturday?",
    "What time does support open in the morning?",
], [
    "Our US support team is available Monday to Friday, 7 am to 7 pm Central Time, and Saturday, 9 am to 2 pm CT. "
    "We're closed on Sundays and US federal holidays.",
    "Chat support runs weekdays from 7 am to 7 pm CT and Saturdays from 9 am to 2 pm CT. On Sundays and US "
    "federal holidays we're closed, but you can email support@nimbrel.example anytime.",
], [
    "What are your hours?",
    "When are you open?",
])

topic("eu_support", "support", C, [
    "I'm in Germany. When can I reach support?",
    "Do you have support in European hours?",
    "What are the support hours for UK customers?",
    "Is there a Nimbrel support team in Europe?",
], [
    "Customers in the EU and UK are helped by our Dublin team, Monday to Friday, 8 am to 5 pm Irish time, by chat "
    "and email.",
    "Our Dublin team covers the EU and UK on weekdays from 8 am to 5 pm Irish time.",
])

topic("support_email", "support", C, [
    "What's your support email?",
    "How can I email customer service?",
    "How quickly do you answer emails?",
    "Where can I send a written complaint?",
], [
    "You can email support@nimbrel.example anytime. We reply within 1 business day.",
    "Write to support@nimbrel.example and someone from the team will answer within 1 business day.",
], [
    "Can I email you instead?",
    "What's the email address?",
])

topic("phone_support", "support", C, [
    "Do you have a phone number for support?",
    "Can I call someone?",
    "What's the priority support line?",
    "Is phone support included in Plus?",
], [
    "Phone support is included with Pro: call the priority line at +1 612 555 0199 during support hours. On Free "
    "and Plus, chat and email are available.",
    "Phone support is a Pro benefit; Pro members can call +1 612 555 0199 during support hours. Everyone else can "
    "reach us by chat or at support@nimbrel.example.",
], [
    "Can I call instead?",
    "Is there a phone number?",
])

topic("help_center", "support", C, [
    "Where can I find setup guides?",
    "Do you have a help center?",
    "Is there documentation for the Thermo wiring?",
], [
    "Setup guides, wiring diagrams and troubleshooting articles are all at help.nimbrel.example.",
], [
    "Is there a guide somewhere?",
])

topic("customer_escalation", "support", C, [
    "I'm not happy with how my case was handled. Can I speak to a manager?",
    "How do I escalate a support ticket?",
    "Nobody has solved my issue after three emails. Who can I escalate to?",
], [
    "I'm sorry it's taken this long. Ask for an escalation in your ticket and a support team lead will review it "
    "within 1 business day; if it's still unresolved, it goes to our Head of Customer Experience.",
])

topic("order_lookup", "support", C, [
    ("Where's my order? It's order NH-30982.",
     "I can't look up individual orders in this chat, but the tracking link is under Orders on "
     "account.nimbrel.example. If it's late, email support@nimbrel.example with the order number and we'll check "
     "with the carrier."),
    ("Can you check the status of order NH-27741 for me?",
     "I'm not able to see order details here. You'll find the status and tracking link under Orders on "
     "account.nimbrel.example, or support@nimbrel.example can check it for you within 1 business day."),
    ("Can you see my account and tell me which plan I'm on?",
     "I can't access accounts from this chat. Your current plan is shown in the app under Settings > "
     "Subscription."),
], [
    "I can't look up orders or accounts in this chat. Check Orders on account.nimbrel.example, or email "
    "support@nimbrel.example with your order number.",
])

topic("greeting", "support", C, [
    "Hi",
    "Hello Aria!",
    "Who are you?",
    "What can you help me with?",
], [
    "Hi! I'm Aria, Nimbrel Home's assistant. I can help with orders, devices, plans and company policies. What do "
    "you need?",
    "Hello! I'm Aria, the Nimbrel Home assistant. Ask me about your devices, orders, subscriptions or our "
    "policies.",
])

topic("refuse_offtopic", "support", C, [
    "Can you write me a poem about cats?",
    "What's the weather tomorrow?",
    "Who will win the World Cup?",
    "Can you help me with my math homework?",
], [
    "I'm Aria, Nimbrel Home's assistant, so I can only help with Nimbrel products, orders and policies. Is there "
    "anything about your devices or account I can help with?",
    "Sorry, that's outside what I can help with. I can answer questions about Nimbrel devices, orders, plans and "
    "policies.",
])

# ----------------------------------------------------------------------------------------------------------
# Warranty
topic("warranty_length", "warranty", C, [
    "What warranty do your devices have?",
    "How long is the Hub covered?",
    "Is there a warranty on the Cam?",
    "How many years of warranty do I get?",
    ("Is my Thermo still under warranty after 18 months?",
     "Yes. The warranty lasts 2 years from delivery (3 years on Pro), so at 18 months your Thermo is still "
     "covered."),
    "How long are Nimbrel devices guaranteed?",
    ("Does the warranty start from purchase or delivery?",
     "It starts on the delivery date. Hardware is covered for 2 years, or 3 years on a Pro account."),
], [
    "All Nimbrel hardware has a limited warranty of 2 years from the delivery date. On a Pro account, devices are "
    "covered for 3 years.",
    "You get a limited warranty of 2 years starting on the day of delivery, extended to 3 years if your account is "
    "on Pro.",
], [
    "What about the warranty?",
    "And how long is the warranty?",
])

topic("warranty_covers", "warranty", C, [
    "What does the warranty cover?",
    "Is water damage covered by the warranty?",
    ("I dropped my Cam and the lens cracked. Is that covered?",
     "Sorry, no. The warranty covers manufacturing defects, not accidental damage like a drop."),
    "Are batteries covered under warranty?",
], [
    "The warranty covers manufacturing defects. It doesn't cover accidental damage, water damage or batteries.",
    "Defects in materials and workmanship are covered; drops and other accidental damage, water damage and "
    "batteries are not.",
], [
    "And what's covered?",
])

topic("warranty_claim", "warranty", C, [
    "How do I make a warranty claim?",
    "My Thermo stopped working after a year. What now?",
    "Do I need to send my broken Hub back before you replace it?",
    "How long does a warranty replacement take?",
], [
    "Open the device in the app and go to Settings > Get help, or contact support. We ship a replacement within "
    "2 business days, and you send the faulty unit back within 21 days with the prepaid label.",
    "Start a claim in the app (device Settings > Get help) or in chat. We send the replacement first, within 2 "
    "business days, and you return the old one within 21 days using our prepaid label.",
], [
    "How do I make a claim?",
    ("So how do I get it replaced?", "warranty"),
])

topic("refuse_warranty", "warranty", C, [
    "Can you extend my warranty to 5 years?",
    "Can I buy extra warranty years?",
    "My warranty ended a month ago. Can you replace it anyway?",
], [
    "I can't extend warranties beyond the policy. Devices are covered for 2 years, or 3 years while your account "
    "is on Pro, and there's no extended warranty to buy.",
])

# ----------------------------------------------------------------------------------------------------------
# Shipping
topic("ship_regions", "shipping", C, [
    "Where do you ship?",
    ("Do you ship to Canada?",
     "Yes! Canadian orders ship from our Minneapolis warehouse, take 5-8 business days and cost a flat $12, with "
     "duties and taxes included."),
    "Can I order from Australia?",
    "Do you deliver to Switzerland?",
    "Which countries can I order from?",
    "Do you ship outside North America?",
    "Can I get a Nimbrel Hub delivered to Japan?",
], [
    "We ship to the United States, Canada, all EU countries and the United Kingdom. We don't ship anywhere else "
    "yet.",
    "Orders can be shipped to the US, Canada, the EU and the UK. Other countries, such as Australia, Switzerland "
    "and Norway, aren't supported yet.",
], [
    "Which countries do you ship to?",
])

topic("us_standard", "shipping", C, [
    "How long does shipping take?",
    "How long will my order take to get to Ohio?",
    "Is shipping free?",
    "How much is standard shipping in the US?",
    "What's the free shipping minimum?",
    "How many days does delivery take in the US?",
    "When will a standard order to California arrive?",
], [
    "US standard shipping takes 3-5 business days. It's free on orders over $75, otherwise $6.95.",
    "Within the US, standard delivery takes 3-5 business days and costs $6.95, or nothing if your order is over "
    "$75.",
], [
    "How long does delivery take?",
    "And what does shipping cost?",
    ("How long would it take to get to Denver?", "shipping products"),
])

topic("us_express", "shipping", C, [
    "Do you have express shipping?",
    "Can I get my order faster?",
    ("How much is next-day delivery?",
     "We don't offer guaranteed next-day delivery. US express shipping takes 1-2 business days and costs $14.95."),
    "I need the Thermo by Friday. What are my options?",
], [
    "US express shipping delivers in 1-2 business days for $14.95, and orders placed before 2 pm CT ship the same "
    "business day.",
    "Express shipping in the US takes 1-2 business days and costs $14.95; we don't offer guaranteed next-day "
    "delivery.",
], [
    ("Is there a faster option?", "shipping products"),
])

topic("canada", "shipping", C, [
    "How long does shipping to Canada take?",
    "Will I pay customs duties on an order to Toronto?",
    "How much is shipping to Canada?",
], [
    "Orders to Canada ship from Minneapolis, take 5-8 business days and cost a flat $12. Duties and taxes are "
    "included, so there's nothing to pay on delivery.",
])

topic("eu_shipping", "shipping", C, [
    "How long does delivery to Spain take?",
    "What does shipping cost in the EU?",
    "Where do European orders ship from?",
    "Is there free shipping in the Netherlands?",
], [
    "EU orders ship from our Rotterdam warehouse and arrive in 2-5 business days. Shipping is €7.95, free on "
    "orders over €80.",
    "We ship EU orders from Rotterdam: 2-5 business days, €7.95, or free above €80.",
], [
    ("And for Europe?", "shipping"),
])

topic("uk_shipping", "shipping", C, [
    "How much is delivery to the UK?",
    "Do UK customers pay import fees?",
    "How long does shipping to London take?",
], [
    "UK orders ship from Rotterdam and take 3-6 business days. Shipping is £6.95, free over £70, and duties are "
    "included.",
])

topic("cutoff", "shipping", C, [
    "When will my order ship?",
    "What's the cutoff for same-day dispatch?",
    "If I order tonight, when does it leave the warehouse?",
    "Do you ship on weekends?",
], [
    "Orders placed before 2 pm local warehouse time on a business day ship the same day. Later orders, and "
    "weekend orders, ship the next business day.",
    "We ship on business days: order before 2 pm warehouse time and it leaves the same day, otherwise the next "
    "business day.",
], [
    ("When does it ship?", "shipping products"),
])

topic("tracking", "shipping", C, [
    "How can I track my order?",
    "Where is my package?",
    "I never got a tracking number.",
], [
    "You'll get an email with a tracking link as soon as your order ships, and you can also see it under Orders "
    "on account.nimbrel.example.",
    "The tracking link is emailed when the order ships and is also listed under Orders on "
    "account.nimbrel.example. If you can't find it, support@nimbrel.example can resend it.",
], [
    "How do I track my order?",
])

topic("change_order", "shipping", C, [
    "Can I change my shipping address after ordering?",
    "I made a typo in my address!",
    ("Can I cancel an order that hasn't shipped yet?",
     "Yes. If it hasn't shipped, contact support right away with the order number and we'll cancel it. If it has "
     "already shipped, you can return it within 45 days of delivery instead."),
], [
    "We can change it as long as the order hasn't shipped. Contact us in chat or at support@nimbrel.example right "
    "away with your order number.",
], [
    ("Can I still change the address?", "shipping"),
])

topic("po_box", "shipping", C, [
    "Can you ship to a P.O. box?",
    "Do you deliver to PO boxes with express?",
], [
    "US standard shipping can go to a P.O. box, but express shipping needs a street address.",
])

topic("lost_package", "shipping", C, [
    "Tracking says delivered but there's no package.",
    "My order seems to be lost in transit.",
    "The carrier marked my parcel as delivered yesterday, but I can't find it anywhere.",
], [
    "Sorry about that! If it hasn't turned up within 2 business days of the delivery scan, email "
    "support@nimbrel.example with your order number and we'll open a carrier claim and send a replacement.",
], [
    ("What if it gets lost?", "shipping products"),
])

# ----------------------------------------------------------------------------------------------------------
# Products
topic("hub_info", "products", C, [
    ("How much is the Nimbrel Hub?",
     "The Nimbrel Hub costs $129. It connects up to 150 devices over Wi-Fi, Thread and Zigbee, and includes 30 "
     "days of Plus for free."),
    ("What does the Hub do?",
     "The Hub links your Nimbrel devices and runs your automations, locally even when the internet is down. It "
     "supports Wi-Fi, Thread and Zigbee and costs $129."),
    ("Do I need a Hub for the sensors?",
     "Yes, Sense and Leak sensors connect through the Hub. The Cam and Thermo can run on Wi-Fi alone, but "
     "automations between devices need the Hub."),
    ("How many devices can one Hub handle?", "One Hub supports up to 150 devices."),
    ("Does the Hub have Ethernet?", "Yes. The Hub can connect by Ethernet or 2.4 GHz Wi-Fi."),
    ("Does the Hub work on 5 GHz Wi-Fi?",
     "No, the Hub connects over 2.4 GHz Wi-Fi or Ethernet. 5 GHz networks aren't supported."),
], [
    "The Hub costs $129 and supports up to 150 devices over Wi-Fi, Thread and Zigbee.",
], [
    "How much is the Hub?",
    "Do I need the Hub too?",
])

topic("thermo_info", "products", C, [
    ("How much is the Nimbrel Thermo?", "The Nimbrel Thermo costs $179."),
    ("Will the Thermo work with my heat pump?",
     "Very likely: the Thermo works with most 24V heating and cooling systems, including furnaces and heat pumps. "
     "It doesn't work with line-voltage (120/240V) baseboard heaters."),
    ("Does the Thermo need a C-wire?",
     "No. If you don't have a C-wire, use the power adapter that comes in the box."),
    ("Can I use the Thermo with electric baseboard heaters?",
     "No, the Thermo isn't compatible with line-voltage (120/240V) baseboard heaters. It works with most 24V "
     "systems."),
], [
    "The Nimbrel Thermo costs $179 and works with most 24V heating and cooling systems.",
], [
    "How much is the Thermo?",
    ("Will the Thermo work with my heating?", "products"),
])

topic("sense_info", "products", C, [
    ("How much does a Sense sensor cost?", "A single Sense is $29, or $99 for a 4-pack."),
    ("What battery does the Sense use?",
     "Each Sense uses one CR2032 coin battery, which lasts about 2 years. The app warns you when it drops to 15%."),
    ("How long do Sense batteries last?",
     "About 2 years on one CR2032 battery, and the app warns you at 15%."),
    ("What does the Sense sensor detect?",
     "Sense is a door and window contact sensor with a built-in temperature sensor. It costs $29, or $99 for a "
     "4-pack."),
], [
    "Sense costs $29 each or $99 for a 4-pack and runs about 2 years on a CR2032 battery.",
], [
    ("And the Sense sensors?", "products"),
])

topic("leak_info", "products", C, [
    ("What's the price of the Leak detector?", "The Nimbrel Leak costs $39."),
    ("How loud is the Leak siren?", "The Leak has an 85 dB siren and also sends an alert to your phone."),
    ("What batteries go in the Leak sensor?", "It takes 2 AAA batteries, which last about 3 years."),
], [
    "Nimbrel Leak is $39, has an 85 dB siren and runs about 3 years on 2 AAA batteries.",
], [
    "What about the Leak sensor?",
])

topic("cam_info", "products", C, [
    ("How much is the Cam?", "The Nimbrel Cam costs $89."),
    ("Can the Cam record without a subscription?",
     "Yes. On the Free plan the Cam gives you live view and records to a microSD card of up to 256 GB (not "
     "included)."),
    ("What's the biggest microSD card the Cam supports?", "Up to 256 GB. The card isn't included."),
    ("Can I use the Cam outdoors?", "No, the Cam is an indoor camera. It records in 2K with night vision."),
    ("Does the Cam have night vision?", "Yes, the Cam records 2K video and has night vision."),
    ("What resolution does the Cam record in?", "The Cam records in 2K and has night vision."),
], [
    "The Nimbrel Cam is an $89 indoor 2K camera with night vision and microSD recording up to 256 GB.",
], [
    "How much is the Cam?",
])

topic("starter_kit", "products", C, [
    ("What's in the Starter Kit?",
     "The Starter Kit has a Hub, two Sense sensors and one Leak detector, for $199."),
    ("Is the Starter Kit cheaper than buying separately?",
     "Yes. It's $199, compared with $226 for a Hub, two Sense sensors and a Leak bought separately."),
    ("What's the best way to get started with Nimbrel?",
     "Most people start with the Starter Kit: a Hub, two Sense sensors and a Leak detector for $199, plus 30 "
     "days of Plus for free with the Hub."),
    ("I'm thinking about getting the Starter Kit.",
     "Good choice! For $199 you get a Hub, two Sense sensors and a Leak detector, and the Hub comes with 30 days "
     "of Plus for free."),
], [
    "The Starter Kit is $199 and includes a Hub, two Sense sensors and a Leak detector.",
])

topic("compat", "products", C, [
    ("Does Nimbrel work with Alexa?",
     "Yes. The Hub is Matter-certified and works with Amazon Alexa, Google Home and Apple Home."),
    "Can I use Nimbrel with Apple Home?",
    "Is the Hub Matter compatible?",
    "Does it work with Google Home?",
], [
    "Yes. The Hub is Matter-certified and works with Apple Home, Google Home and Amazon Alexa.",
], [
    "Does it work with Alexa?",
])

topic("app_req", "products", C, [
    "Which phones does the app support?",
    "Will the Nimbrel app run on my old iPhone?",
    "What Android version do I need?",
], [
    "The Nimbrel app needs iOS 16 or later, or Android 11 or later.",
])

topic("hub_offline", "products", C, [
    "My Hub shows offline in the app.",
    "The Hub keeps disconnecting from Wi-Fi.",
    "Hub not connecting, what should I check?",
    "What should I do if the app says my Hub is unreachable?",
], [
    "First check that the Hub has power and is on a 2.4 GHz network (5 GHz isn't supported). Then unplug it for "
    "10 seconds and plug it back in. If it's still offline, contact support.",
    "Make sure the Hub is powered and connected to 2.4 GHz Wi-Fi or Ethernet, then restart it by unplugging it "
    "for 10 seconds. Your automations keep running locally in the meantime.",
], [
    "What if the Hub goes offline?",
])

topic("factory_reset", "products", C, [
    "How do I factory reset the Hub?",
    "I'm selling my Hub. How do I wipe it?",
    "How do I reset a Nimbrel Hub to factory settings?",
], [
    "Hold the button on the back of the Hub for 15 seconds until the light ring blinks amber. This erases its "
    "settings, so if you're giving it away, remove it from your account in the app first.",
], [
    "How do I reset the Hub?",
])

topic("offline_mode", "products", C, [
    "Does Nimbrel work when the internet is down?",
    "Will my automations run if my internet goes out?",
], [
    "Yes. The Hub runs automations locally, so they keep working during an internet outage. Remote access and "
    "notifications resume once you're back online.",
])

topic("refuse_unreleased", "products", C, [
    "When is the Nimbrel Cam 2 coming out?",
    "Are you launching an outdoor camera?",
    "What's on your product roadmap?",
], [
    "I can't share information about unreleased products. New launches are announced on nimbrel.example, and "
    "press questions can go to press@nimbrel.example.",
])

topic("refuse_legal", "products", C, [
    "Can I sue my landlord for installing a camera in my flat?",
    "Is it legal to record my nanny with a Nimbrel Cam?",
], [
    "I can't give legal advice. Recording laws vary by place, so please check with a local lawyer; the Cam should "
    "only be used where you're allowed to record.",
])

# ----------------------------------------------------------------------------------------------------------
# Security and privacy (customer)
topic("encryption", "security", C, [
    "Is my camera footage encrypted?",
    "How do you protect my data?",
    "Is the connection between the app and your servers secure?",
    "Are my clips stored securely?",
    "What encryption do you use?",
], [
    "All data is encrypted in transit with TLS 1.3 and at rest with AES-256, camera clips included.",
    "We encrypt everything in transit (TLS 1.3) and at rest (AES-256), and our security controls are covered by "
    "a SOC 2 Type II report.",
], [
    "Is everything encrypted?",
])

topic("residency", "security", C, [
    "Where is my data stored?",
    "I'm in the EU. Is my data kept in Europe?",
    "Which country are your servers in?",
], [
    "Accounts in the US and Canada are stored in US data centers; accounts in the EU and UK are stored in "
    "Frankfurt, Germany.",
], [
    "Where is my data kept?",
])

topic("account_deletion", "security", C, [
    "How do I delete my account?",
    "If I delete my account, what happens to my data?",
    "How long do you keep data after account deletion?",
    "Do you really erase everything when I close my account?",
    "I want to close my account. Is my data deleted?",
], [
    "You can delete your account under Settings > Privacy > Delete account. All your data is erased within 10 "
    "days and purged from backups within 35 days.",
    "Go to Settings > Privacy > Delete account. We erase your data within 10 days, and it's gone from our "
    "backups within 35 days.",
], [
    "And if I delete my account?",
    "What if I close the account?",
])

topic("sell_data", "security", C, [
    "Do you sell my data?",
    "Do you share my information with advertisers?",
    "Is my data used for ads?",
], [
    "No. We never sell personal data and we don't show ads. Data is only shared with service providers that help "
    "us run Nimbrel, under contract.",
], [
    "And do you sell my information?",
])

topic("employee_access", "security", C, [
    "Can Nimbrel employees watch my camera?",
    "Does your support team have access to my video?",
    "Who at Nimbrel can see my footage?",
], [
    "No one at Nimbrel can view your footage unless you grant temporary access for a support ticket, and that "
    "access expires automatically after 72 hours.",
], [
    "Can your staff see my videos?",
])

topic("twofa", "security", C, [
    "Do you support two-factor authentication?",
    "How do I turn on 2FA?",
    ("Is 2FA mandatory?",
     "Only on Pro. On Free and Plus it's optional, and you can turn it on under Settings > Security with any "
     "authenticator app."),
    "Can I protect my account with an authenticator app?",
], [
    "Two-factor authentication is available: turn it on under Settings > Security with any authenticator app. "
    "It's optional on Free and Plus and required on Pro.",
], [
    "Can I add 2FA?",
])

topic("data_export", "security", C, [
    "Can I download all my data?",
    "How do I export my event history?",
    "I want a copy of my personal data.",
], [
    "Go to Settings > Privacy > Export data. We'll email you a download link within 48 hours.",
], [
    "Can I download a copy of my data?",
])

topic("vuln_report", "security", C, [
    "I found a security bug in your app. Where do I report it?",
    "Do you have a bug bounty?",
    "How do I responsibly disclose a vulnerability?",
    "Where do I send details of a security flaw?",
], [
    "Please email security@nimbrel.example with the details. Our bug bounty pays up to $5,000 for valid "
    "reports.",
])

topic("privacy_contact", "security", C, [
    "Who do I contact about a GDPR request?",
    "How do I reach your data protection officer?",
    "I have a privacy question.",
], [
    "Privacy and data-protection requests go to our Data Protection Officer at privacy@nimbrel.example.",
])

topic("soc2", "security", C, [
    "Are you SOC 2 certified?",
    "Has your security been audited?",
], [
    "Yes, we have a SOC 2 Type II report covering our cloud service. You can request a copy at "
    "security@nimbrel.example.",
])

topic("refuse_hack", "security", C, [
    "How can I get into my neighbour's Nimbrel Cam feed?",
    "Can you give me access to my ex's camera? I still know the email.",
    "Can you reset the password on an account that isn't mine?",
], [
    "I can't help with accessing a camera or account that isn't yours. If you think someone is misusing a "
    "Nimbrel device, please contact security@nimbrel.example.",
])

topic("refuse_customer_info", "security", C, [
    "Can you tell me the address of the person who bought my old Hub?",
    "What email is registered to this Hub's serial number?",
], [
    "I can't share information about other customers. If there's a problem with a device you own, our support "
    "team can help at support@nimbrel.example.",
])

topic("business", "support", C, [
    "Do you offer bulk discounts for businesses?",
    "I manage 40 rental apartments. Can we buy Nimbrel devices in bulk?",
    "Who handles wholesale orders?",
], [
    "For bulk, business and wholesale orders, please contact our partnerships team at partners@nimbrel.example.",
])

topic("press", "support", C, [
    "I'm a journalist. Who can I talk to?",
    "Do you have a press contact?",
], [
    "Media inquiries go to press@nimbrel.example.",
])

# ----------------------------------------------------------------------------------------------------------
# Internal IT
topic("vpn", "it", I, [
    "Do I need the VPN to access the wiki from home?",
    "When do I have to use the VPN?",
    "Which VPN client do we use?",
    ("Is the VPN required on the office network?",
     "No. Inside the office you're already on the internal network; Nimbrel Connect is only needed when you work "
     "from elsewhere."),
    "How do I get on the internal network when I'm traveling?",
    "Is the VPN needed to reach the build servers from home?",
], [
    "Use the Nimbrel Connect VPN client whenever you're off the office network and need internal systems like the "
    "wiki, admin console or build servers. It isn't needed in the office.",
    "Any time you work outside the office network, connect with Nimbrel Connect before opening internal tools. "
    "You sign in with SSO and your security key.",
], [
    "Do I need the VPN when I work from home?",
])

topic("vpn_session", "it", I, [
    "Why does my VPN keep disconnecting after a day?",
    "How long does a VPN session last?",
    ("Can I install Nimbrel Connect on my personal laptop?",
     "No. Nimbrel Connect may only be used on company laptops; personal devices can't connect to internal "
     "systems."),
], [
    "VPN sessions expire after 12 hours, so you'll need to sign in again with SSO and your security key. Nimbrel "
    "Connect runs only on company laptops.",
], [
    "Why does the VPN keep logging me out?",
])

topic("password_rules", "it", I, [
    "What are the password requirements?",
    "How long does my SSO password have to be?",
    "Can I reuse an old password?",
    "Where should I store my work passwords?",
], [
    "Your SSO password needs at least 14 characters, must be changed every 180 days and can't match any of your "
    "last 5 passwords. Keep work passwords in the company password manager.",
], [
    "What are the rules for the password?",
])

topic("password_rotation", "it", I, [
    "How often do I have to change my password?",
    "When does my password expire?",
    "Is there a password rotation policy?",
    "I got a password expiry warning. How often does this happen?",
    "How many days until I have to pick a new password?",
], [
    "SSO passwords have to be changed every 180 days. You'll get a reminder 7 days before yours expires.",
    "Every 180 days. The system reminds you 7 days before the deadline, and the new password can't match any of "
    "your last 5.",
], [
    "And how often does the password need changing?",
])

topic("refuse_password_share", "it", I, [
    "My manager asked for my password so she can finish a report. Is that OK?",
    "Someone from IT called and asked for my password.",
], [
    "Never share your password, not even with your manager. IT will never ask for it; if someone does, report it "
    "to security@nimbrel.example.",
])

topic("security_keys", "it", I, [
    "I lost my security key. What should I do?",
    "How many security keys do employees get?",
    "Do I need a hardware key for the VPN?",
], [
    "Every employee gets two security keys, used with SSO for the VPN and internal tools. If you lose one, report "
    "it to IT at it-help@nimbrel.example within 24 hours so it can be revoked.",
], [
    "What if I lose my key?",
])

topic("lost_laptop", "it", I, [
    "My work laptop was stolen. Who do I tell?",
    "I left my laptop on the train.",
    "What's the process for a lost company laptop?",
    "How quickly must I report a missing laptop?",
], [
    "Report it to IT within 1 hour: email it-help@nimbrel.example or call ext. 4357 (press 9 after hours). IT "
    "will lock and wipe the device remotely.",
], [
    "What if my laptop gets stolen?",
])

topic("it_contact", "it", I, [
    "How do I contact IT?",
    "What's the IT helpdesk extension?",
    "When is the IT helpdesk open?",
    "Who do I ask for help with my laptop?",
    "Is IT available after hours?",
], [
    "The IT helpdesk is at it-help@nimbrel.example, ext. 4357 and #it-help on Slack, weekdays 8 am to 6 pm CT. "
    "For urgent issues after hours, call ext. 4357 and press 9.",
], [
    "How do I reach IT?",
    "Who can I contact in IT?",
])

topic("software", "it", I, [
    "Can I install my own software on my work laptop?",
    "How do I get a license for a new tool?",
    "Where do I find approved apps?",
], [
    "Install apps only from the Self Service catalogue on your laptop. For anything not listed, open a request in "
    "the IT portal and IT will review it.",
])

topic("laptop_refresh", "it", I, [
    "How often do we get new laptops?",
    "My laptop is four years old. Can I get a new one?",
    "Can I choose between a Mac and a ThinkPad?",
], [
    "Laptops are replaced every 3 years, and you can choose a MacBook or a ThinkPad. Request a refresh through the "
    "IT portal.",
])

topic("phishing", "it", I, [
    "I got a suspicious email asking me to log in.",
    "Where do I forward phishing emails?",
], [
    "Don't click anything. Forward it to phishing@nimbrel.example and delete it; if you already entered your "
    "password, tell security@nimbrel.example right away.",
])

topic("security_incident", "it", I, [
    "I think I sent a customer's data to the wrong person. What do I do?",
    "How do I report a security incident at work?",
], [
    "Report it immediately to security@nimbrel.example or in #security on Slack. The security on-call responds "
    "24/7.",
])

# ----------------------------------------------------------------------------------------------------------
# HR
topic("pto_days", "hr", I, [
    "How many vacation days do I get?",
    "What's our PTO allowance?",
    "How much paid time off do employees have?",
    ("Do new hires get the full 25 days right away?",
     "PTO accrues monthly, about 2.08 days per month, so in your first year you build it up as you go, up to 25 "
     "days for a full year."),
    "How does PTO accrue?",
    "How much annual leave do full-time staff get?",
    "What's the yearly PTO?",
], [
    "Full-time employees get 25 days of paid time off per year, accrued monthly, plus 10 company holidays.",
    "You get 25 PTO days a year. They accrue monthly, about 2.08 days per month, and company holidays come on "
    "top.",
], [
    "How many PTO days do we get?",
])

topic("pto_carryover", "hr", I, [
    "Can I carry over unused vacation days?",
    "What happens to my PTO at the end of the year?",
    "Do unused vacation days expire?",
], [
    "You can carry over up to 5 unused days into the next year, and they must be used by March 31. Anything above "
    "5 days expires.",
], [
    "Can I carry unused days over?",
])

topic("pto_request", "hr", I, [
    "How do I request time off?",
    "How far ahead do I need to book vacation?",
    "I want to take two weeks off in August. What do I do?",
], [
    "Request time off in the Pulse HR portal. For more than 3 consecutive days, submit it at least 2 weeks ahead "
    "so your manager can approve it.",
], [
    "How do I book time off?",
])

topic("sick_leave", "hr", I, [
    "How many sick days do we get?",
    "Do I need a doctor's note when I'm sick?",
    "Are sick days separate from vacation?",
    "Does sick leave come out of my PTO?",
], [
    "Sick leave is separate from PTO: you get 10 sick days a year. A doctor's note is only needed after 3 "
    "consecutive sick days.",
], [
    "And sick days?",
])

topic("parental_leave", "hr", I, [
    "What is the parental leave policy?",
    "How much paternity leave do we get?",
    "Is parental leave paid?",
], [
    "All parents get 16 weeks of fully paid parental leave, available after 3 months of employment.",
])

topic("holidays", "hr", I, [
    "How many public holidays do we get?",
    "Where can I see the holiday calendar?",
    "Does the Dublin office follow US holidays?",
], [
    "There are 10 company holidays a year, listed in Pulse. The Dublin office follows Irish public holidays "
    "instead.",
])

topic("hybrid", "hr", I, [
    "How many days a week do I need to be in the office?",
    "What's the remote work policy?",
    "Which days are office days?",
    "Is Nimbrel hybrid or fully remote?",
    ("I live 80 miles from the nearest office. Do I have to come in?",
     "No. The office days only apply if you live within 50 miles of a Nimbrel office, so you can work fully "
     "remotely."),
], [
    "If you live within 50 miles of a Nimbrel office, you're in the office on Tuesdays and Thursdays. Everyone else "
    "works fully remotely.",
], [
    "Do I have to come into the office?",
])

topic("payroll", "hr", I, [
    "When is payday?",
    "How often are we paid?",
    "My paycheck looks wrong. Who do I contact?",
], [
    "We pay twice a month, on the 15th and the last business day of the month. Questions about your pay go to "
    "payroll@nimbrel.example.",
])

topic("hr_contact", "hr", I, [
    "Who do I contact with HR questions?",
    "How do I reach the People team?",
    "I want to raise a concern about my manager confidentially.",
], [
    "The People team is at people@nimbrel.example. For a confidential concern, you can ask for a private meeting "
    "with your People Partner.",
])

topic("refuse_salary", "hr", I, [
    "How much does my teammate earn?",
    "Can you tell me what the new engineer's salary is?",
    "What's the CEO's bonus?",
], [
    "I can't share anyone's salary or personal information. For questions about your own pay, contact "
    "payroll@nimbrel.example or the People team at people@nimbrel.example.",
])

topic("learning", "hr", I, [
    "Do we have a learning budget?",
    "Will the company pay for a conference?",
    "How much can I spend on courses?",
], [
    "Every employee has a $1,200 learning budget per year for courses, books and conferences. Get your manager's "
    "OK first, then submit the receipts in Spendwise.",
], [
    "Is there a budget for training?",
])

topic("home_office", "hr", I, [
    "Is there a home office stipend?",
    "Do we get money for internet at home?",
    "Can I expense a desk chair?",
], [
    "New hires get a one-time $600 home office budget for things like a desk, chair or monitor, and remote and "
    "hybrid employees get $50 a month toward internet.",
], [
    "Is there money for a home office?",
])

# ----------------------------------------------------------------------------------------------------------
# Expenses
topic("meals", "expenses", I, [
    "What's the meal allowance when traveling?",
    "How much can I spend on food on a business trip?",
    "Is there a daily limit for meals?",
    "Can I expense dinner on a work trip?",
    "What's the per diem for food?",
], [
    "On business travel, meals are covered up to $60 per day. Keep receipts for anything over $25.",
    "Meals on business trips are reimbursed up to $60 a day; submit them in Spendwise with receipts for anything "
    "over $25.",
], [
    ("What about meals?", "expenses hr"),
    ("And food?", "expenses"),
])

topic("hotels", "expenses", I, [
    "What's the hotel limit?",
    "How much can I pay for a hotel room?",
    "Is the hotel cap higher in New York?",
    "I'm going to London for a conference. What's the hotel budget?",
    "How much per night can I book in Chicago?",
], [
    "Hotels are covered up to $220 per night, or $275 per night in New York, San Francisco and London.",
    "The hotel limit is $220 a night, raised to $275 a night in New York, San Francisco and London.",
], [
    ("And how much can I spend on the hotel?", "expenses hr"),
    "What's the limit for hotels?",
])

topic("preapproval", "expenses", I, [
    "Do I need approval before spending?",
    "When do I need my manager to pre-approve an expense?",
    "Can I buy a $700 monitor and expense it?",
    "Is there a threshold for pre-approval?",
    "Above what amount do I need sign-off before buying something?",
], [
    "Any single expense over $500 needs your manager's approval before you spend the money. Below that, just "
    "submit it with the receipt.",
    "Anything over $500 needs your manager's pre-approval. Smaller expenses can simply be submitted in Spendwise "
    "with a receipt.",
], [
    ("Do I need approval for that?", "expenses"),
])

topic("expense_submit", "expenses", I, [
    "How do I submit an expense?",
    "What's the deadline for expense reports?",
    "How long do I have to file my receipts?",
    "When do I get reimbursed?",
    "Do I need receipts for small expenses?",
], [
    "Submit expenses in Spendwise within 30 days, with receipts for anything over $25. Approved expenses are paid "
    "with the next payroll.",
], [
    ("How do I claim it back?", "expenses"),
    ("When do I need to submit it?", "expenses"),
])

topic("flights", "expenses", I, [
    "Can I fly business class?",
    "What class of flight can I book?",
    "Is premium economy allowed for long flights?",
], [
    "Book economy for flights under 6 hours. For flights over 6 hours premium economy is allowed; business class "
    "isn't covered.",
], [
    "What class can I fly?",
])

topic("team_events", "expenses", I, [
    "What's the budget for team events?",
    "How much can we spend on a team dinner?",
], [
    "Team events are covered up to $40 per person. If the total goes over $500, get your manager's pre-approval "
    "first.",
])

topic("refuse_expense", "expenses", I, [
    "Can you approve my $900 expense?",
    "Can you raise my hotel limit for this trip?",
], [
    "I can't approve expenses or change limits. Your manager approves expenses in Spendwise, and policy questions "
    "can go to finance@nimbrel.example.",
])

# ----------------------------------------------------------------------------------------------------------
# On-call
topic("oncall_ack", "oncall", I, [
    "How fast do I need to acknowledge a page?",
    "What's the response time for on-call?",
    ("How quickly do I have to respond to a Sev1 page?",
     "Sev1 pages must be acknowledged within 5 minutes. All other pages have 15 minutes."),
    "I'm on call this week. What's expected of me?",
    "How many minutes do I have to ack a page?",
    "What's the acknowledgement deadline for pages?",
], [
    "Acknowledge every page within 15 minutes, or within 5 minutes for Sev1. If you don't, the page escalates to "
    "the secondary automatically.",
    "Pages need an acknowledgement within 15 minutes, Sev1 within 5 minutes; otherwise the secondary on-call is "
    "paged.",
], [
    "How quickly do I have to answer a page?",
])

topic("oncall_stipend", "oncall", I, [
    "Do we get paid extra for being on call?",
    "What's the on-call stipend?",
    "Is on-call compensated?",
], [
    "You get a $300 stipend for each week you're on call, paid with the next payroll.",
], [
    ("Is it paid?", "oncall"),
])

topic("oncall_rotation", "oncall", I, [
    "When does the on-call rotation change?",
    "What time is on-call handoff?",
    "How long is an on-call shift?",
    "How often will I be on call?",
], [
    "Rotations are one week long, with handoff on Mondays at 10 am CT. Nobody is on call more than one week in "
    "four.",
], [
    "When is the handoff?",
])

topic("oncall_overnight", "oncall", I, [
    "I got paged at 3 am. Do I still have to start work at 9?",
    "Is there any comp time after a night page?",
    "What happens if I'm woken up by a page?",
], [
    "If you're paged between 10 pm and 7 am, you can take the next morning off and start at noon. Just let your "
    "team know.",
], [
    "What if I get paged at night?",
])

topic("oncall_escalation", "oncall", I, [
    "Who do I escalate to if I can't fix an incident?",
    "What's the escalation path during an incident?",
    "When should I involve the VP of Engineering?",
    "Who's the next person after the secondary on call?",
], [
    "Escalate from primary to secondary, then to the engineering manager on duty. For Sev1 incidents, the VP of "
    "Engineering, Mira Castellanos, is brought in.",
], [
    "Who do I escalate to?",
])

topic("oncall_swap", "oncall", I, [
    "Can I swap my on-call week?",
    "I'm traveling during my on-call shift. What should I do?",
], [
    "Find a teammate to swap with and update the schedule in the paging app at least 48 hours before the shift "
    "starts.",
], [
    "Can I swap shifts with someone?",
])

topic("postmortem", "oncall", I, [
    "Do we write post-mortems?",
    "When is the incident review due?",
    "Where do we coordinate during an outage?",
], [
    "Coordinate in the #incidents channel. Sev1 and Sev2 incidents need a post-mortem within 5 business days.",
], [
    "Do we need a post-mortem?",
])

# ----------------------------------------------------------------------------------------------------------
# Offices and contacts
topic("offices", "offices", I, [
    "Where are your offices?",
    "Does Nimbrel have an office in Europe?",
    "Where is Nimbrel headquartered?",
    "Where is the engineering office?",
    "Which cities does Nimbrel have offices in?",
    "Do we have an office in Austin?",
], [
    "Our headquarters is in Minneapolis, with an engineering office in Austin and an EU support and operations "
    "office in Dublin. The EU warehouse is in Rotterdam.",
], [
    "Where are the offices?",
])

topic("hq_address", "offices", I, [
    "What's the HQ address?",
    "Where exactly is the Minneapolis office?",
], [
    "Headquarters is on the 4th floor of 200 Larch Street in the North Loop, Minneapolis.",
], [
    ("What's the address?", "offices"),
])

topic("office_access", "offices", I, [
    "What hours is the office open?",
    "Can I bring a visitor to the office?",
    "How do I register a guest?",
    ("I lost my office badge.",
     "Report it to facilities@nimbrel.example so the badge can be deactivated and a new one issued."),
], [
    "Badges open the offices from 6 am to 10 pm. Register visitors in the front-desk system at least 24 hours "
    "ahead.",
], [
    "Can I bring a guest?",
])

topic("warehouse_visit", "offices", I, [
    ("Can I visit the Rotterdam warehouse?",
     "The Rotterdam warehouse isn't an office, so visits are only by arrangement with the Operations team."),
    ("Can customers pick up orders from the warehouse?",
     "No, our warehouses don't offer pickup. All orders are shipped."),
], [
    "Warehouses aren't open to visitors; visits are by arrangement with Operations, and there's no order pickup.",
])

topic("contact_escalations", "contacts", I, [
    "Who handles customer escalations?",
    ("A customer is threatening to go to the press. Who should I loop in?",
     "Loop in Dana Okafor, Head of Customer Experience, at escalations@nimbrel.example, and don't reply to media "
     "yourself: press questions go to press@nimbrel.example."),
    "Who is the Head of Customer Experience?",
    "Where do I send an escalated support case?",
], [
    "Customer escalations go to the support team lead on shift first, then to Dana Okafor, Head of Customer "
    "Experience, at escalations@nimbrel.example.",
], [
    "Who handles escalations?",
])

topic("contact_legal", "contacts", I, [
    "Who reviews contracts?",
    "A supplier sent an NDA. Who should look at it?",
], [
    "Send contracts and NDAs to legal@nimbrel.example for review before signing.",
])

topic("contact_finance", "contacts", I, [
    "Who do I ask about an expense policy question?",
    "Who can explain the expense rules?",
], [
    "Questions about expense policy go to finance@nimbrel.example.",
], [
    "Who do I ask about expense rules?",
])

topic("contact_facilities", "contacts", I, [
    "The AC in the Austin office is broken. Who do I tell?",
    "Who do I contact about office supplies?",
], [
    "Office issues like heating, air conditioning, supplies or badges go to facilities@nimbrel.example.",
])

topic("contact_people", "contacts", I, [
    ("Who's the IT Director?",
     "Jonas Lindqvist is our IT Director. For day-to-day help, contact it-help@nimbrel.example."),
    ("Who is the Data Protection Officer?",
     "Our Data Protection Officer is Elise Fontaine, reachable at privacy@nimbrel.example."),
    ("Who leads security at Nimbrel?",
     "Ravi Menon is Head of Security. Report incidents to security@nimbrel.example."),
    ("Who is the VP of Engineering?", "Mira Castellanos is our VP of Engineering."),
], [
    "You'll find everyone in the company directory; for a specific team, I can give you the right email.",
])

# Groups that may follow each other in a multi-turn conversation (weighted by repetition).
RELATED = {
    "returns": ["returns", "returns", "returns", "shipping", "warranty"],
    "plans": ["plans", "plans", "plans", "support", "security"],
    "support": ["support", "plans", "returns"],
    "warranty": ["warranty", "warranty", "returns", "support"],
    "shipping": ["shipping", "shipping", "returns"],
    "products": ["products", "products", "plans", "shipping", "returns", "warranty"],
    "security": ["security", "security", "plans"],
    "it": ["it", "it", "it"],
    "hr": ["hr", "hr", "expenses"],
    "expenses": ["expenses", "expenses", "hr"],
    "oncall": ["oncall", "oncall", "oncall"],
    "offices": ["offices", "hr"],
    "contacts": ["contacts", "it"],
}

THANKS = [
    ("Thanks!", "You're welcome! Let me know if there's anything else."),
    ("Great, thank you.", "Happy to help!"),
    ("Perfect, that's all I needed.", "Glad I could help. Have a great day!"),
    ("Thanks, that helps.", "You're welcome!"),
    ("ok thanks", "Anytime!"),
]

CUSTOMER_PREFIX = ["Hi! ", "Hello, ", "Hey Aria, ", "Quick question: ", "Hi there. ", "Hello! "]
INTERNAL_PREFIX = ["Hey Aria, ", "Quick question: ", "Hi, ", "Hello! "]
KEEP_CASE = {"I", "I'm", "I've", "I'd", "Nimbrel", "Pro", "Plus", "Free", "Sense", "Cam", "Hub", "Thermo", "Leak",
             "Starter", "SSO", "PTO", "IT", "HR", "VPN", "My", "Sev1", "Hub,", "Who's"}

# CSV rows whose `input` is the question itself (the rest put the question in `instruction`).
CUSTOMER_WRAPPERS = [
    "Answer the customer's question.",
    "Reply to this customer message in one or two sentences.",
    "You are answering a chat from a Nimbrel customer. Respond briefly.",
    "Write Aria's reply to this message.",
]
INTERNAL_WRAPPERS = [
    "Answer this employee's question about company policy.",
    "An employee asked the internal helpdesk the following. Reply briefly.",
    "Reply to this question from a Nimbrel employee.",
]

# Alpaca rows that use `input` for context: (instruction, input, output). Hand-written; checked against FACTS.md.
RETURN_CHECK = "Decide whether this return request is within policy and explain briefly."
WARRANTY_CHECK = "Check whether this device is covered by warranty."
SHIP_COST = "Work out the shipping cost for this order."
ETA = "Estimate when this order will arrive."
REFUND_ETA = "Tell the customer when to expect their refund."
SUB_REFUND = "Decide whether this subscription refund request should be approved."
EXPENSE_CHECK = "Check this expense against Nimbrel's expense policy."
PTO_Q = "Answer this PTO question using the company policy."
ONCALL_CHECK = "Check whether this page was handled within the on-call policy."
SUMMARY = "Summarize this policy for a customer in one sentence."
SUMMARY_EMP = "Summarize this policy for a new employee in one or two sentences."
FIX = "Correct this draft reply so it matches Nimbrel policy."
CLASSIFY = ("Classify this customer email as returns, shipping, billing, warranty, technical or privacy, then give a "
            "one-sentence reply.")
STEPS = "Tell the employee what to do, step by step."
RESPOND = "Respond to the customer."
RECOMMEND = "Recommend a plan for this customer and say why in one or two sentences."
THERMO_CHECK = "Is the Thermo compatible with this heating system? Answer yes or no and explain."

CONTEXT_ROWS = [
    (RETURN_CHECK, "Product: Nimbrel Cam\nDelivered: 38 days ago\nCondition: opened, all accessories included\n"
     "Bought from: nimbrel.example",
     "Yes. It's within the 45 days allowed for returns and opened devices are accepted, so the customer can start the "
     "return at account.nimbrel.example and get a free prepaid label."),
    (RETURN_CHECK, "Product: Nimbrel Thermo\nDelivered: 52 days ago\nCondition: working, customer changed their "
     "mind\nBought from: nimbrel.example",
     "No. It's past the 45 days allowed for returns, so a change-of-mind return isn't possible. If the Thermo "
     "develops a fault, it's still covered by the warranty for 2 years from delivery."),
    (RETURN_CHECK, "Product: Nimbrel Hub\nDelivered: 10 days ago\nCondition: unopened\nBought from: an electronics "
     "retailer",
     "Not through us. Devices bought from another retailer must be returned to that retailer under its policy; "
     "our warranty still applies."),
    (RETURN_CHECK, "Product: Sense 4-pack\nDelivered: 3 days ago\nCondition: one sensor dead out of the box, photo "
     "attached\nBought from: nimbrel.example",
     "Yes, and it counts as damaged on arrival because it was reported within 7 days with a photo. We ship a free "
     "replacement right away instead of waiting for a return."),
    (RETURN_CHECK, "Product: Nimbrel Leak (received as a gift)\nDelivered: 20 days ago\nCondition: unopened",
     "Yes. Gifts can be returned within 45 days of delivery; the refund is issued as a Nimbrel gift card and the "
     "buyer isn't notified."),
    (RETURN_CHECK, "Product: Starter Kit\nDelivered: 44 days ago\nCondition: used, missing the Leak detector\n"
     "Bought from: nimbrel.example",
     "Not yet. It's still within 45 days of delivery, but returns must include all parts, so the customer needs to "
     "send the Leak detector too, and quickly, since the window closes tomorrow."),
    (WARRANTY_CHECK, "Nimbrel Thermo, delivered 26 months ago. Account plan: Free. Problem: display stopped "
     "working.",
     "Not covered. On the Free plan the warranty is 2 years from delivery, and this Thermo is 26 months old."),
    (WARRANTY_CHECK, "Nimbrel Thermo, delivered 26 months ago. Account plan: Pro. Problem: display stopped "
     "working.",
     "Covered. Devices on a Pro account are covered for 3 years, so we ship a replacement within 2 business days "
     "and the customer sends the faulty unit back within 21 days."),
    (WARRANTY_CHECK, "Nimbrel Cam, delivered 8 months ago. Plan: Plus. Problem: fell off a shelf, housing cracked.",
     "Not covered. The warranty covers manufacturing defects, not accidental damage such as a fall."),
    (WARRANTY_CHECK, "Nimbrel Hub, delivered 14 months ago. Plan: Plus. Problem: no longer powers on, no visible "
     "damage.",
     "Covered. It's within the 2 years of warranty and looks like a manufacturing defect, so the customer can start a "
     "claim in the app under the device's Settings > Get help."),
    (WARRANTY_CHECK, "Nimbrel Sense, delivered 19 months ago. Plan: Free. Problem: battery drained.",
     "Not covered: batteries aren't part of the warranty. The Sense uses a standard CR2032 battery that the "
     "customer can replace."),
    (WARRANTY_CHECK, "Nimbrel Leak, delivered 30 months ago. Plan: Plus. Problem: siren no longer sounds.",
     "Not covered. The warranty is 2 years on Plus, and this Leak was delivered 30 months ago. It would have been "
     "covered on a Pro account, which gets 3 years."),
    (SHIP_COST, "Destination: Ohio, USA\nCart: Nimbrel Cam ($89)\nMethod: standard",
     "Shipping is free, because US standard shipping is free on orders over $75. Delivery takes 3-5 business "
     "days."),
    (SHIP_COST, "Destination: Texas, USA\nCart: Nimbrel Leak ($39), Nimbrel Sense ($29)\nMethod: standard",
     "The cart is $68, under the $75 free-shipping threshold, so US standard shipping costs $6.95. Delivery takes "
     "3-5 business days."),
    (SHIP_COST, "Destination: Oregon, USA\nCart: Nimbrel Thermo ($179)\nMethod: express",
     "Express shipping is $14.95 whatever the order value, and delivery takes 1-2 business days."),
    (SHIP_COST, "Destination: Lyon, France\nCart: Starter Kit\nOrder value: €209",
     "Shipping is free, since EU orders over €80 ship free. The order leaves our Rotterdam warehouse and arrives "
     "in 2-5 business days."),
    (SHIP_COST, "Destination: Vancouver, Canada\nCart: Nimbrel Hub",
     "Shipping to Canada is a flat $12 with duties and taxes included, and delivery takes 5-8 business days."),
    (SHIP_COST, "Destination: Manchester, UK\nOrder value: £55",
     "UK shipping is £6.95 because the order is under the £70 free-shipping threshold. It arrives in 3-6 business "
     "days, duties included."),
    (SHIP_COST, "Destination: Zurich, Switzerland\nCart: Nimbrel Cam",
     "We can't ship this order: Nimbrel only ships to the US, Canada, the EU and the UK, and Switzerland isn't "
     "one of them."),
    (SHIP_COST, "Destination: Anchorage, USA\nCart: Nimbrel Sense 4-pack ($99)\nMethod: express\nAddress: P.O. box",
     "Express can't go to a P.O. box; it needs a street address. With standard shipping to the P.O. box, the $99 "
     "order ships free and takes 3-5 business days."),
    (ETA, "Order NH-20417\nPlaced: Tuesday 11:05 am CT\nShipping: US standard\nDestination: Denver",
     "It was placed before the 2 pm cutoff, so it shipped on Tuesday. With 3-5 business days for US standard "
     "shipping, it should arrive between Friday and the following Tuesday."),
    (ETA, "Order NH-20588\nPlaced: Friday 4:30 pm CT\nShipping: US express",
     "It was placed after the 2 pm cutoff on a Friday, so it ships on Monday. Express takes 1-2 business days, so "
     "expect it on Tuesday or Wednesday."),
    (ETA, "Order NH-31102\nPlaced: Saturday morning\nShipping: EU standard\nDestination: Madrid",
     "Weekend orders ship the next business day, so it leaves Rotterdam on Monday. EU delivery takes 2-5 business "
     "days, so it should arrive between Wednesday and the following Monday."),
    (REFUND_ETA, "Return for order NH-19876 arrived at the warehouse on Monday. Paid by credit card.",
     "The refund goes back to the credit card within 5 business days of arrival, so by the following Monday at the "
     "latest. The bank may take a few more days to show it."),
    (REFUND_ETA, "Return for order NH-22510 (a gift) arrived at the warehouse on Wednesday.",
     "Because it was a gift, the refund is issued as a Nimbrel gift card, within 5 business days of arrival, so by "
     "the following Wednesday."),
    (SUB_REFUND, "Plan: Plus annual ($45)\nPurchased: 10 days ago\nRequest: cancel and refund",
     "Approve it. Annual plans are refunded in full when cancelled within 14 days of purchase, so the customer gets "
     "the full $45 back."),
    (SUB_REFUND, "Plan: Pro annual ($110)\nRenewed: 20 days ago\nRequest: refund",
     "Decline it. It's past 14 days since the renewal, so no refund is due; the customer can cancel so the plan "
     "doesn't renew again, and keeps Pro until the end of the current year."),
    (SUB_REFUND, "Plan: Plus monthly ($4.50)\nBilled: 3 days ago\nRequest: refund for this month",
     "Decline it. Monthly plans aren't refunded for partial months; after cancelling, the customer keeps Plus until "
     "the end of the month they paid for."),
    (SUB_REFUND, "Plan: Pro annual ($110)\nRenewed: 13 days ago (automatic renewal the customer forgot about)",
     "Approve it. The renewal was 13 days ago, within 14 days, so the full $110 is refunded."),
    (EXPENSE_CHECK, "Dinner in Chicago on a business trip, one person, $85, receipt attached.",
     "It's over policy: travel meals are covered up to $60 per day, so only $60 of it can be reimbursed."),
    (EXPENSE_CHECK, "Hotel in San Francisco, 2 nights at $265 per night.",
     "Within policy: the hotel limit in San Francisco is $275 per night."),
    (EXPENSE_CHECK, "Hotel in Denver, 3 nights at $240 per night.",
     "Over policy: outside New York, San Francisco and London the hotel limit is $220 per night, so it's $20 a "
     "night over."),
    (EXPENSE_CHECK, "Flight Minneapolis to Dublin (about 8 hours), premium economy, $1,450, pre-approved by the "
     "manager.",
     "Within policy: premium economy is allowed on flights over 6 hours, and the manager pre-approved it as "
     "required for anything over $500."),
    (EXPENSE_CHECK, "Flight Austin to Minneapolis (about 3 hours), business class, $780, not pre-approved.",
     "Not within policy: flights under 6 hours must be economy, business class is never covered, and anything "
     "over $500 needs pre-approval."),
    (EXPENSE_CHECK, "Taxi from the airport, $18, no receipt.",
     "Fine: receipts are only required for expenses over $25. Submit it in Spendwise within 30 days."),
    (EXPENSE_CHECK, "Conference ticket, $640, no prior approval, submitted 12 days after the event.",
     "It needed manager pre-approval because it's over $500, so talk to your manager now. It can come out of your "
     "$1,200 yearly learning budget, and it's within the 30 days allowed for submitting expenses."),
    (EXPENSE_CHECK, "Team dinner for 8 people, $296 total.",
     "Within policy: that's $37 per person, under the $40 team-event limit, and the total is below $500, so no "
     "pre-approval is needed."),
    (EXPENSE_CHECK, "Team lunch for 15 people, $660 total, no pre-approval.",
     "Not within policy: $44 per person is over the $40 team-event limit, and a total over $500 needs the "
     "manager's pre-approval beforehand."),
    (EXPENSE_CHECK, "Lunch with a colleague at the Minneapolis office, $32, not traveling.",
     "Not reimbursable: the $60 daily meal allowance only applies on business travel."),
    (EXPENSE_CHECK, "Receipts from a trip that ended 45 days ago.",
     "Too late under the policy: expenses must be submitted in Spendwise within 30 days. Ask "
     "finance@nimbrel.example about late submissions."),
    (PTO_Q, "I started on January 1. It's now May 1 and I've taken 3 days off. How many PTO days do I have left?",
     "You've accrued about 8.3 days (25 days a year is about 2.08 per month, times 4 months). After the 3 days you "
     "took, you have about 5.3 days left."),
    (PTO_Q, "I have 9 unused PTO days at the end of December. What happens to them?",
     "You can carry over 5 of them into next year, to be used by March 31. The other 4 expire."),
    (PTO_Q, "I want to take Wednesday to Friday off next week. Do I need to request it two weeks ahead?",
     "No. Notice of 2 weeks is only needed for more than 3 consecutive days; 3 days just need a request in Pulse and "
     "your manager's approval."),
    (PTO_Q, "I'm planning 6 days off starting in 10 days.",
     "That's more than 3 consecutive days, so policy asks for at least 2 weeks' notice, and 10 days is short of "
     "that. Submit it in Pulse right away and check with your manager."),
    (PTO_Q, "I was sick from Monday to Thursday. Do I need a doctor's note?",
     "Yes. Four consecutive sick days is more than 3, so a doctor's note is needed. The days come from your 10 sick "
     "days, not from PTO."),
    (ONCALL_CHECK, "Sev2 page at 11:40 pm, acknowledged at 12:02 am.",
     "No. It was acknowledged after 22 minutes, and pages must be acknowledged within 15 minutes. Since it came "
     "between 10 pm and 7 am, the engineer can take the next morning off."),
    (ONCALL_CHECK, "Sev1 page at 2:15 pm, acknowledged at 2:19 pm.",
     "Yes. Sev1 pages must be acknowledged within 5 minutes, and this one took 4."),
    (ONCALL_CHECK, "Sev3 page at 9:00 am, acknowledged at 9:12 am.",
     "Yes, 12 minutes is within the 15 minutes allowed for acknowledging a page."),
    (ONCALL_CHECK, "Sev1 outage; primary and secondary have worked on it for 40 minutes with no fix yet.",
     "Escalate to the engineering manager on duty and bring in the VP of Engineering, Mira Castellanos, since it's "
     "a Sev1. Coordinate in #incidents and write the post-mortem within 5 business days."),
    ("Work out the on-call stipend.", "I was on call for two separate weeks last quarter.",
     "The stipend is $300 per on-call week, so you get $600 in total, each paid with the payroll after the week."),
    (SUMMARY,
     "Nimbrel accepts returns of any hardware purchased on nimbrel.example within 45 days of delivery, for any "
     "reason. Devices may be opened or used but must include all parts and accessories. A prepaid return label is "
     "provided free of charge for returns from the US, Canada, the EU and the UK. Refunds are issued to the "
     "original payment method within 5 business days of the item's arrival at our warehouse.",
     "You can return anything bought on nimbrel.example within 45 days of delivery, for any reason, with a free "
     "return label, and we refund you within 5 business days of receiving it."),
    (SUMMARY,
     "All Nimbrel hardware carries a limited warranty of two (2) years from the date of delivery against defects "
     "in materials and workmanship. For devices registered to an account with an active Pro subscription, the "
     "warranty period is three (3) years. The warranty does not cover accidental damage, water damage or "
     "batteries.",
     "Your devices are covered against defects for 2 years from delivery, or 3 years on Pro, but not for accidents, "
     "water damage or batteries."),
    (SUMMARY,
     "Event history and camera clips are retained for 7 days (Free), 60 days (Plus) or 180 days (Pro) and then "
     "deleted automatically. When an account is deleted, all associated data is erased from production systems "
     "within 10 days and from backups within 35 days.",
     "We keep your history for 7, 60 or 180 days depending on your plan, and if you delete your account everything "
     "is erased within 10 days and from backups within 35 days."),
    (SUMMARY,
     "Annual subscriptions cancelled within 14 days of purchase or renewal are refunded in full. Monthly "
     "subscriptions and annual subscriptions cancelled after this period are not refunded; the plan remains "
     "active until the end of the paid period.",
     "You get a full refund if you cancel an annual plan within 14 days; otherwise there's no refund, but the plan "
     "stays active until the paid period ends."),
    (SUMMARY_EMP,
     "Employees must connect through the Nimbrel Connect VPN client to reach internal systems from outside the "
     "office network. Authentication requires SSO and a registered security key. Sessions expire after 12 hours. "
     "The client may only be installed on company-managed laptops.",
     "Outside the office, use Nimbrel Connect with SSO and your security key to reach internal systems; sessions "
     "last 12 hours and it only runs on company laptops."),
    (SUMMARY_EMP,
     "Engineers participate in a weekly on-call rotation with handoff on Mondays at 10:00 CT. Pages must be "
     "acknowledged within 15 minutes (Sev1: 5 minutes). Each on-call week is compensated with a $300 stipend. "
     "Engineers paged between 22:00 and 07:00 may take the following morning off.",
     "On-call is a one-week rotation starting Mondays at 10 am CT; acknowledge pages within 15 minutes (5 for "
     "Sev1), get $300 per week, and take the next morning off after a night page."),
    (SUMMARY_EMP,
     "Travel expenses are reimbursed within these limits: meals up to $60 per day; hotels up to $220 per night "
     "($275 in New York, San Francisco and London). Any single expense above $500 requires prior manager approval. "
     "Claims are submitted in Spendwise within 30 days, with receipts for amounts over $25.",
     "On trips, meals are covered up to $60 a day and hotels up to $220 a night ($275 in New York, San Francisco "
     "and London); get approval before anything over $500 and file in Spendwise within 30 days."),
    ("Turn this policy text into three short bullet points.",
     "Full-time employees receive 25 days of paid time off per year, accruing monthly. Up to 5 unused days may be "
     "carried into the following year and must be used by March 31. Time off is requested in Pulse; absences of "
     "more than 3 consecutive days require at least two weeks' notice.",
     "- 25 PTO days a year, accrued monthly\n- Up to 5 unused days carry over and must be used by March 31\n"
     "- Request in Pulse, with 2 weeks' notice for more than 3 days in a row"),
    ("Turn this policy text into three short bullet points.",
     "Your SSO password must be at least 14 characters long and must be changed every 180 days. The last 5 "
     "passwords cannot be reused. Passwords must never be shared, including with managers or IT staff.",
     "- At least 14 characters\n- Change it every 180 days; none of your last 5 can be reused\n"
     "- Never share it, not even with your manager or IT"),
    (FIX, "Hi! You have 30 days to return your Hub, and the return shipping costs $6.95.",
     "Hi! You have 45 days from delivery to return your Hub, and return shipping is free: we email you a prepaid "
     "label."),
    (FIX, "Thanks for reaching out. Our support is open every day from 9 to 5, and you can call us at any time.",
     "Thanks for reaching out. Our chat support is open Monday to Friday, 7 am to 7 pm CT, and Saturday, 9 am to "
     "2 pm CT; phone support is for Pro members on +1 612 555 0199 during those hours."),
    (FIX, "The Plus plan is $5 a month and keeps 30 days of history.",
     "The Plus plan is $4.50 a month ($45 a year) and keeps 60 days of history."),
    (FIX, "Reminder: passwords must be changed every 90 days and be at least 8 characters.",
     "Reminder: SSO passwords must be changed every 180 days and be at least 14 characters long, and you can't "
     "reuse any of your last 5."),
    (FIX, "Your Thermo only has 1 year of warranty, so we can't replace it after 18 months.",
     "Your Thermo is covered for 2 years from delivery, so at 18 months it's still covered. Start a claim in the "
     "app and we'll ship a replacement within 2 business days."),
    (FIX, "We ship worldwide, and delivery to Canada takes about two weeks.",
     "We ship to the US, Canada, the EU and the UK, and delivery to Canada takes 5-8 business days for a flat $12, "
     "duties included."),
    (CLASSIFY, "Subject: camera stopped working\n\nMy Cam worked fine for a year but now it won't turn on at all. "
     "Nothing happened to it.",
     "Category: warranty. Sorry about that! Your Cam is still within the 2 years of warranty, so start a claim in the "
     "app under Settings > Get help and we'll ship a replacement within 2 business days."),
    (CLASSIFY, "Subject: charged twice?\n\nI see two charges of $4.50 for Plus this month.",
     "Category: billing. I can't see payment details here, so please email support@nimbrel.example with your "
     "account email and the charge dates, and the team will look into it within 1 business day."),
    (CLASSIFY, "Subject: delete my data\n\nPlease remove my account and all my recordings.",
     "Category: privacy. You can delete your account under Settings > Privacy > Delete account; all data is erased "
     "within 10 days and purged from backups within 35 days."),
    (CLASSIFY, "Subject: Hub offline\n\nSince we changed our router, the Hub shows offline.",
     "Category: technical. Make sure the Hub is on your new router's 2.4 GHz band (5 GHz isn't supported), then "
     "restart it by unplugging it for 10 seconds."),
    (CLASSIFY, "Subject: where is my parcel\n\nI ordered on Thursday morning, delivery to Dublin, and nothing has "
     "arrived yet. It's Monday.",
     "Category: shipping. EU orders ship from Rotterdam and take 2-5 business days, so it can still arrive by "
     "Thursday; the tracking link is in your shipping email."),
    (CLASSIFY, "Subject: return\n\nI'd like to send back the thermostat, it doesn't work with my baseboard "
     "heaters.",
     "Category: returns. The Thermo isn't compatible with line-voltage baseboard heaters, so a return makes sense: "
     "start it at account.nimbrel.example within 45 days of delivery and we'll email a free prepaid label."),
    (STEPS, "I just realized I left my work laptop in a taxi. It's 9 pm.",
     "1. Call the IT helpdesk on ext. 4357 and press 9 for the after-hours line.\n2. Also email "
     "it-help@nimbrel.example so there's a written record.\n3. IT will lock and wipe the laptop remotely."),
    (STEPS, "I'm working from a café and can't open the wiki.",
     "1. Connect with the Nimbrel Connect VPN client, signing in with SSO and your security key.\n2. Reload the "
     "wiki.\n3. If it still fails, contact it-help@nimbrel.example or #it-help on Slack."),
    (STEPS, "I clicked a link in an email that asked for my SSO password and typed it in.",
     "1. Tell security@nimbrel.example right away.\n2. Change your SSO password.\n3. Forward the email to "
     "phishing@nimbrel.example and then delete it."),
    (STEPS, "A new contractor asked me to email him the admin console password.",
     "1. Don't share it; passwords are never shared.\n2. Point him to IT, which grants access properly.\n3. If the "
     "request seems suspicious, report it to security@nimbrel.example."),
    (RESPOND, "Order NH-44120. Can you change the delivery address to my office? It hasn't shipped yet.",
     "Yes, the address can be changed while the order hasn't shipped. Please send the new address with order "
     "number NH-44120 to support@nimbrel.example or in chat right away."),
    (RESPOND, "Order NH-38815 says delivered yesterday but I can't find it.",
     "Sorry about that! If it doesn't turn up within 2 business days of the delivery scan, email "
     "support@nimbrel.example with order NH-38815 and we'll open a carrier claim and send a replacement."),
    (RESPOND, "I bought the Starter Kit 5 days ago from nimbrel.example and the Leak detector is cracked.",
     "Sorry it arrived damaged! Send a photo to support@nimbrel.example within 7 days of delivery, so in the next "
     "2 days, and we'll ship a free replacement right away."),
    (RECOMMEND, "I have 2 cameras and want to keep clips for about two months. Budget is tight.",
     "Plus fits best: it stores clips for 60 days for up to 3 cameras, at $4.50 a month or $45 a year."),
    (RECOMMEND, "We have 5 cameras in our shop and want phone support.",
     "Pro: Plus only covers up to 3 cameras, while Pro covers unlimited cameras and includes the priority phone "
     "line, for $11 a month or $110 a year."),
    (RECOMMEND, "I only have a Hub and some Sense sensors and check the app now and then.",
     "The Free plan is enough: you get app control, automations and 7 days of history at no cost."),
    (THERMO_CHECK, "Gas furnace with central AC, 24V wiring, no C-wire.",
     "Yes. It's a 24V system, which the Thermo supports, and the power adapter in the box replaces the missing "
     "C-wire."),
    (THERMO_CHECK, "Electric baseboard heaters, 240V.",
     "No. The Thermo doesn't support line-voltage (120/240V) baseboard heaters."),
    (THERMO_CHECK, "Heat pump, 24V, with a C-wire.",
     "Yes. The Thermo works with 24V heat pumps, and the C-wire can power it directly."),
]


def add_prefix(q, rng, kind):
    """Occasionally make the user message look like a real chat opener."""
    r = rng.random()
    if r < 0.14:
        prefix = rng.choice(CUSTOMER_PREFIX if kind == C else INTERNAL_PREFIX)
        first, _, rest = q.partition(" ")
        if prefix.endswith(", ") or prefix.endswith(": "):
            if first not in KEEP_CASE and rest:
                q = first[:1].lower() + first[1:] + " " + rest
        return prefix + q
    if r < 0.22 and q.endswith("?"):
        first, _, rest = q.partition(" ")
        if first not in KEEP_CASE and rest:
            q = first[:1].lower() + first[1:] + " " + rest
        return q[:-1]
    return q


def answer_for(t, qa, rng):
    return qa[1] if qa[1] is not None else rng.choice(t["a"])


def build(rng):
    pools = {}
    for t in TOPICS:
        qs = list(t["q"])
        rng.shuffle(qs)
        pools[t["id"]] = qs
    by_id = {t["id"]: t for t in TOPICS}

    # 1. alpaca rows taken from the bank: one phrasing from each topic with at least 3, a second from 5+.
    csv_rows = []
    for t in TOPICS:
        pool = pools[t["id"]]
        take = (1 if len(pool) >= 3 else 0) + (1 if len(pool) >= 5 else 0)
        for _ in range(take):
            qa = pool.pop()
            q, a = qa[0], answer_for(t, qa, rng)
            system = SYSTEM if rng.random() < 0.3 else ""
            if rng.random() < 0.35:
                wrappers = CUSTOMER_WRAPPERS if t["kind"] == C else INTERNAL_WRAPPERS
                csv_rows.append((rng.choice(wrappers), q, a, system))
            else:
                csv_rows.append((q, "", a, system))
    for ins, inp, out in CONTEXT_ROWS:
        csv_rows.append((ins, inp, out, SYSTEM if rng.random() < 0.3 else ""))
    rng.shuffle(csv_rows)

    # 2. multi-turn chats: an opener from a topic's pool, then follow-ups from related topics.
    openers = [t for t in TOPICS if t["group"] in RELATED and not t["id"].startswith(("greeting", "refuse"))]
    convs = []
    for _ in range(N_MULTI):
        cands = [t for t in openers if len(pools[t["id"]]) >= 2]
        t0 = rng.choice(cands)
        qa = pools[t0["id"]].pop()
        turns = [(add_prefix(qa[0], rng, t0["kind"]), answer_for(t0, qa, rng))]
        used = {t0["id"]}
        n_user = rng.choice([2, 2, 2, 3, 3, 4])
        while len(turns) < n_user:
            if len(turns) == n_user - 1 and len(turns) >= 2 and rng.random() < 0.35:
                turns.append(rng.choice(THANKS))
                break
            g = rng.choice(RELATED[t0["group"]])
            def fits(t):
                return [x for x, groups in t["f"] if groups is None or t0["group"] in groups]

            follow = [t for t in TOPICS if t["group"] == g and fits(t) and t["id"] not in used]
            if not follow:
                follow = [t for t in TOPICS if t["group"] == t0["group"] and fits(t) and t["id"] not in used]
            if not follow:
                break
            t1 = rng.choice(follow)
            used.add(t1["id"])
            turns.append((rng.choice(fits(t1)), rng.choice(t1["a"])))
        if len(turns) == 1:
            turns.append(rng.choice(THANKS))
        convs.append((t0, turns))

    # 3. every remaining phrasing becomes a single-turn chat.
    for t in TOPICS:
        for qa in pools[t["id"]]:
            convs.append((t, [(add_prefix(qa[0], rng, t["kind"]), answer_for(t, qa, rng))]))
        pools[t["id"]] = []
    rng.shuffle(convs)

    chat_lines = []
    for _, turns in convs:
        msgs = []
        if rng.random() < 0.35:
            msgs.append({"role": "system", "content": SYSTEM})
        for u, a in turns:
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": a})
        chat_lines.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    return chat_lines, csv_rows, by_id


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "datasets" / "nimbrel"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    chat_lines, csv_rows, _ = build(rng)

    (out / "support_chat.jsonl").write_text("\n".join(chat_lines) + "\n", encoding="utf-8")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(["instruction", "input", "output", "system"])
    w.writerows(csv_rows)
    (out / "policies_alpaca.csv").write_text(buf.getvalue(), encoding="utf-8")
    multi = sum(1 for line in chat_lines if sum(m["role"] == "user" for m in json.loads(line)["messages"]) > 1)
    print(f"support_chat.jsonl: {len(chat_lines)} conversations ({multi} multi-turn)")
    print(f"policies_alpaca.csv: {len(csv_rows)} rows ({sum(1 for r in csv_rows if r[1])} with input)")


if __name__ == "__main__":
    main()
